//! Crash recovery of the passthrough backend: a backend that records every change in
//! the recovery journal ([`PassthroughFs::journaled`]), the checkpoints it takes while
//! serving, the backend a successor rebuilds after a `kill -9`
//! ([`PassthroughFs::recover`]), and how that successor answers the requests the kernel
//! resends exactly once.
//!
//! A successor restores the checkpoint's tables without descriptors (nodes found again
//! by their path hints and keys, as a restore onto shared storage does), replays the
//! records after it, and opens every handle again: through the open file the
//! supervisor kept for it where there is one (so an open file unlinked meanwhile keeps
//! its data and its node), else on its node with the recorded flags. What cannot be
//! found again answers ESTALE; everything else carries on.
//!
//! A resent request is answered from what its first execution did: its outcome if one
//! was recorded; otherwise its intent and the export as it is now tell whether it took
//! effect ([`crate::journal::decide`]), and then it is answered with its success (the
//! entry of what it created, a handle for CREATE); otherwise what it counted is undone
//! and it runs again. This module never trusts the records beyond what
//! [`crate::journal::replay`] checked, and never answers a request it has no record of.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fsva_appliance::journal::Journal;
use fsva_appliance::state::{StateError, StateFd};
use fsva_appliance::{Completed, Keeper, Opened};

use crate::handle::Handle;
use crate::journal::{
    self, CheckpointV1, IntentV1, OpV1, OutcomeV1, PassthroughCheckpoint, Present, ProbeV1,
    Recorder, Trace, Traces, Verdict,
};
use crate::snapshot::{self, HandleKindV1, ObjectV1};
use crate::{
    key_of, reopen_via, restore, sys, PassthroughConfig, PassthroughError, PassthroughFs, Setup,
    STATX_MASK,
};

/// The first half of a recovery, done ahead of need by a spare successor while its
/// predecessor still serves: the last checkpoint decoded and checked, and the open
/// files kept so far. Nothing is opened in the export yet (it changes until the
/// predecessor dies).
pub struct Preloaded {
    checkpoint: Option<CheckpointV1>,
    fds: HashMap<u64, OwnedFd>,
}

impl Preloaded {
    /// Open files kept after the preload.
    pub fn add_fds(&mut self, fds: HashMap<u64, OwnedFd>) {
        self.fds.extend(fds);
    }

    /// Takes `checkpoint` (a newer one than preloaded, or the first), and lets go of
    /// the open files of handles closed before it: handle numbers only grow, so such
    /// a file is never named again (and an unlinked one's space is freed). A handle
    /// whose number was taken before the checkpoint but which was stored just after it
    /// loses its kept file too; it is opened again on its node.
    pub fn reload(&mut self, checkpoint: Option<&[u8]>) -> Result<(), StateError> {
        let Some(bytes) = checkpoint else {
            return Ok(());
        };
        let c = journal::load_checkpoint(bytes)?;
        let open: std::collections::HashSet<u64> =
            c.snapshot.handles.iter().map(|h| h.fh).collect();
        let next = c.snapshot.next_fh;
        self.fds.retain(|fh, _| *fh >= next || open.contains(fh));
        self.checkpoint = Some(c);
        Ok(())
    }
}

/// What a dead predecessor left for its successor.
pub struct Recovery {
    /// The backend's part of the last checkpoint, if one was stored.
    pub checkpoint: Option<Vec<u8>>,
    /// The backend's journal records after it, in order (without their tag byte).
    pub records: Vec<Vec<u8>>,
    /// The open files the supervisor kept, by handle (`fh`).
    pub fds: HashMap<u64, OwnedFd>,
}

/// Traces carried from one recovery into the next checkpoints (a successor that dies
/// before the kernel's resends reached it leaves them to the next one).
const CARRIED: usize = 1024;

/// Checkpoints after a recovery that still carry its traces. The kernel resends what
/// it held before the successor serves, and a successor's first checkpoint comes
/// thousands of records later: by its second every resend has long been read, and
/// what was not asked never will be.
const CARRY_CHECKPOINTS: u32 = 1;

/// A journaled backend's recovery side.
pub(crate) struct Journaled {
    pub recorder: Arc<Recorder>,
    pub keeper: Arc<dyn Keeper>,
    /// How the predecessor's requests ended, for answering their resends.
    traces: Mutex<Traces>,
    has_traces: AtomicBool,
    /// Resent appends and the file size before their first execution (their write
    /// decides, with the bytes in hand).
    appends: Mutex<HashMap<u64, u64>>,
    /// Checkpoints taken since this backend started.
    checkpoints: std::sync::atomic::AtomicU32,
}

impl PassthroughFs {
    /// A backend serving from scratch whose every change goes to `journal` and whose
    /// open files go to `keeper`, so that a successor can take over after a crash.
    pub fn journaled(
        config: PassthroughConfig,
        journal: Arc<Journal>,
        keeper: Arc<dyn Keeper>,
    ) -> Result<PassthroughFs, PassthroughError> {
        let mut fs = PassthroughFs::new(config)?;
        fs.attach(journal, keeper, Traces::default());
        Ok(fs)
    }

    /// A journaled backend replacing one whose state was lost (its checkpoint or
    /// journal could not be read): every node and handle the kernel still holds from
    /// before answers ESTALE; new ones are numbered from `base` on.
    pub fn after_loss(
        config: PassthroughConfig,
        journal: Arc<Journal>,
        keeper: Arc<dyn Keeper>,
        base: u64,
    ) -> Result<PassthroughFs, PassthroughError> {
        let mut fs = PassthroughFs::journaled(config, journal, keeper)?;
        fs.nodes.after_loss(base);
        fs.handles.after_loss(base);
        Ok(fs)
    }

    /// The backend a dead predecessor left: its last checkpoint with the journal
    /// records after it replayed, handles opened again (on the kept open files where
    /// there are some). Kept files nothing names any more are given back. Goes on
    /// recording in `journal`.
    pub fn recover(
        config: PassthroughConfig,
        journal: Arc<Journal>,
        keeper: Arc<dyn Keeper>,
        recovery: Recovery,
    ) -> Result<PassthroughFs, StateError> {
        let p = PassthroughFs::preload(recovery.checkpoint.as_deref(), recovery.fds)?;
        PassthroughFs::finish_recovery(config, p, journal, keeper, recovery.records)
    }

    /// The first half of [`PassthroughFs::recover`], ahead of need (see [`Preloaded`]).
    pub fn preload(
        checkpoint: Option<&[u8]>,
        fds: HashMap<u64, OwnedFd>,
    ) -> Result<Preloaded, StateError> {
        let mut p = Preloaded {
            checkpoint: None,
            fds,
        };
        p.reload(checkpoint)?;
        Ok(p)
    }

    /// The second half: the journal records after the preloaded checkpoint replayed,
    /// the tables rebuilt in the export, the kept files nothing names given back.
    pub fn finish_recovery(
        config: PassthroughConfig,
        p: Preloaded,
        journal: Arc<Journal>,
        keeper: Arc<dyn Keeper>,
        records: Vec<Vec<u8>>,
    ) -> Result<PassthroughFs, StateError> {
        let t0 = std::time::Instant::now();
        let setup = Setup::new(config).map_err(|e| StateError::Backend(e.to_string()))?;
        let replayed = journal::replay(p.checkpoint, &records, setup.root_key.into())?;
        let mut snap = replayed.snapshot;
        let mut kept = p.fds;
        let mut lent = Vec::new();
        for h in &mut snap.handles {
            if let (HandleKindV1::File { .. }, ObjectV1::Absent) = (h.kind, h.object) {
                if let Some(fd) = kept.remove(&h.fh) {
                    h.object = ObjectV1::Lent(lent.len() as u32);
                    lent.push(StateFd::Owned(fd));
                }
            }
        }
        snapshot::check(&snap, lent.len())?;
        let unused: Vec<u64> = kept.into_keys().collect();
        let alt_hints = renamed_maybe(&snap, &replayed.traces);
        // Nodes that may be lost now (every node not lost before).
        let findable: Vec<u64> = snap
            .nodes
            .iter()
            .filter(|n| n.object != ObjectV1::Stale && n.id != fsva_protocol::abi::ROOT_ID)
            .map(|n| n.id)
            .collect();
        let proc_self_fd = setup.proc_self_fd;
        let reopen = |fd: BorrowedFd<'_>, flags: i32| reopen_via(proc_self_fd.as_fd(), fd, flags);
        let restored = restore::rebuild(
            snap,
            lent,
            restore::Export {
                root: setup.config.root,
                root_key: setup.root_key,
                reopen: &reopen,
                verify_handles: true,
                alt_hints: &alt_hints,
            },
        )?;
        tracing::info!(
            nodes = restored.nodes.count(),
            handles = restored.handles.count(),
            stale_nodes = restored.stale_nodes,
            stale_handles = restored.stale_handles,
            records = records.len(),
            resendable = replayed.traces.len(),
            recover_us = t0.elapsed().as_micros() as u64,
            "passthrough state recovered"
        );
        for id in unused {
            keeper.release(id);
        }
        let mut fs = Self::with_tables(
            setup.config.entry_ttl,
            setup.config.attr_ttl,
            setup.config.device_nodes,
            setup.locality,
            proc_self_fd,
            restored.nodes,
            restored.handles,
        );
        if replayed.stale_below > 0 {
            fs.nodes.after_loss(replayed.stale_below);
            fs.handles.after_loss(replayed.stale_below);
        }
        // What this restore decided is recorded, so that a successor replaying the same
        // records decides the same: a node lost now stays lost (its hint might find a
        // new object with the old one's inode number later), a node found under another
        // name keeps it.
        let mut live: std::collections::HashSet<u64> =
            fs.nodes.parts().live.iter().map(|l| l.node.id).collect();
        // A node only open handles hold is not in the table, but found all the same.
        live.extend(fs.handles.parts().live.iter().map(|(_, h)| h.owner().id));
        let mut settled: Vec<OpV1> = findable
            .into_iter()
            .filter(|id| !live.contains(id))
            .map(|id| OpV1::Lost { id })
            .collect();
        settled.extend(
            restored
                .renamed
                .into_iter()
                .filter(|(id, _)| live.contains(id))
                .map(|(id, hint)| OpV1::Rehint {
                    id,
                    hint: Some(hint),
                }),
        );
        fs.attach(journal, keeper, replayed.traces);
        if let (false, Some(j)) = (settled.is_empty(), &fs.recovery) {
            j.recorder.record(0, settled);
        }
        Ok(fs)
    }

    /// Starts recording every change in `journal`.
    fn attach(&mut self, journal: Arc<Journal>, keeper: Arc<dyn Keeper>, traces: Traces) {
        if self.implicit.take().is_some() {
            // A journal records every open file with its handle, for a successor to
            // answer a resent CREATE and reopen it: files opened without OPEN have none.
            tracing::warn!("no-open mode is off: a recovery journal needs OPEN");
        }
        let recorder = Recorder::new(journal);
        self.nodes.record_to(recorder.clone());
        self.handles.record_to(recorder.clone());
        self.recovery = Some(Journaled {
            recorder,
            keeper,
            has_traces: AtomicBool::new(!traces.is_empty()),
            traces: Mutex::new(traces),
            appends: Mutex::default(),
            checkpoints: Default::default(),
        });
    }

    /// See [`fsva_appliance::Filesystem::journal_checkpoint`].
    pub(crate) fn recovery_checkpoint(
        &self,
        rotate: &mut dyn FnMut() -> u64,
    ) -> Result<(Vec<u8>, u64), StateError> {
        let Some(j) = &self.recovery else {
            return Err(StateError::Unsupported(
                "this passthrough backend keeps no recovery journal".into(),
            ));
        };
        // Every record is appended under the lock of what it changes (a table, or the
        // recorder's for intents and outcomes): with all three held, the tables, the
        // open intents, the last records and the boundary agree.
        let nodes = self.nodes.freeze();
        let handles = self.handles.freeze();
        let rec = j.recorder.lock();
        let (node_parts, handle_parts) = (nodes.parts(), handles.parts());
        let stale_below = nodes.stale_below();
        let recent: Vec<_> = rec.recent.iter().cloned().collect();
        let pending: Vec<_> = rec.pending.iter().map(|(&u, i)| (u, i.clone())).collect();
        let boundary = rotate();
        drop((rec, handles, nodes));
        let carried = if !j.has_traces.load(Ordering::Relaxed) {
            Vec::new()
        } else if j.checkpoints.fetch_add(1, Ordering::Relaxed) < CARRY_CHECKPOINTS {
            lock(&j.traces).latest(CARRIED)
        } else {
            j.has_traces.store(false, Ordering::Relaxed);
            *lock(&j.traces) = Traces::default();
            Vec::new()
        };
        let checkpoint = PassthroughCheckpoint::V1(CheckpointV1 {
            snapshot: snapshot::take_portable(node_parts, handle_parts),
            stale_below,
            recent,
            pending,
            carried,
        });
        Ok((journal::encode_checkpoint(&checkpoint), boundary))
    }

    /// See [`fsva_appliance::Filesystem::completed`].
    pub(crate) fn answer_resent(&self, unique: u64) -> Option<Completed> {
        let j = self.recovery.as_ref()?;
        if !j.has_traces.load(Ordering::Relaxed) {
            return None;
        }
        let trace = lock(&j.traces).take(unique)?;
        if let Some(o) = trace.outcome {
            let answer = self.answer_outcome(o);
            match &answer {
                // Recorded again: a successor of this one answers it the same way.
                Some(_) => j.recorder.record(unique, vec![OpV1::Outcome(o)]),
                None => self.undo(unique, &trace),
            }
            return answer;
        }
        match &trace.intent {
            Some(IntentV1::Append { size, .. }) => {
                lock(&j.appends).insert(unique, *size);
                self.undo(unique, &trace);
                None
            }
            Some(intent) => match journal::decide(intent, self) {
                Verdict::Done => {
                    let answer = self.answer_done(unique, intent, &trace);
                    if answer.is_none() {
                        self.undo(unique, &trace);
                    }
                    answer
                }
                Verdict::Again => {
                    self.undo(unique, &trace);
                    None
                }
            },
            None => {
                self.undo(unique, &trace);
                None
            }
        }
    }

    /// Gives back what a request counted before its appliance died, so that running it
    /// again counts it once.
    fn undo(&self, unique: u64, trace: &Trace) {
        for (id, n) in trace.counted() {
            drop(self.nodes.forget(id, n, unique));
        }
        for &fh in &trace.opened {
            drop(self.drop_handle(unique, fh, None));
        }
    }

    /// The reply an outcome stands for, if its node and handle are still there.
    fn answer_outcome(&self, o: OutcomeV1) -> Option<Completed> {
        Some(match o {
            OutcomeV1::Done => Completed::Done,
            OutcomeV1::Written(n) => Completed::Written(n),
            OutcomeV1::Entry { node } => Completed::Entry(self.entry_of(node)?),
            OutcomeV1::Opened { fh } => Completed::Opened(self.opened_any(fh)?),
            OutcomeV1::Created { node, fh } => {
                Completed::Created(self.entry_of(node)?, self.opened_any(fh)?)
            }
        })
    }

    /// An entry of node `id` without counting a lookup (the first execution did).
    fn entry_of(&self, id: u64) -> Option<fsva_appliance::Entry> {
        let n = self.nodes.get(id).ok()?;
        let stx = sys::statx_fd(n.fd(), STATX_MASK, 0).ok()?;
        Some(self.entry(&n, &stx))
    }

    /// The OPEN or OPENDIR reply for an existing handle.
    fn opened_any(&self, fh: u64) -> Option<Opened> {
        match &*self.handles.get(fh).ok()? {
            Handle::Dir { .. } => Some(Self::dir_opened(fh)),
            Handle::File { .. } => Some(self.opened(fh)),
        }
    }

    /// The success of a request that took effect before its outcome was recorded;
    /// None when it cannot be rebuilt (the request then runs again).
    fn answer_done(&self, u: u64, intent: &IntentV1, trace: &Trace) -> Option<Completed> {
        let answer = match intent {
            IntentV1::Make {
                parent, name, open, ..
            } => {
                let node = self.counted_or_looked_up(u, trace, *parent, name)?;
                let entry = self.entry_of(node)?;
                match open {
                    None => {
                        self.settle_again(u, OutcomeV1::Entry { node });
                        Completed::Entry(entry)
                    }
                    Some(flags) => {
                        let fh = match self
                            .handles_of(trace, node)
                            .or_else(|| self.open_created(u, node, *flags))
                        {
                            Some(fh) => fh,
                            None => {
                                // Give back the lookup just counted; the request runs
                                // again (and finds the file it made).
                                drop(self.nodes.forget(node, 1, u));
                                return None;
                            }
                        };
                        self.settle_again(u, OutcomeV1::Created { node, fh });
                        Completed::Created(entry, self.opened(fh))
                    }
                }
            }
            IntentV1::Link {
                node,
                newparent,
                newname,
                ..
            } => {
                let node = if trace.lookups.get(node).is_some_and(|&d| d > 0) {
                    *node
                } else {
                    self.counted_or_looked_up(u, trace, *newparent, newname)?
                };
                let entry = self.entry_of(node)?;
                self.settle_again(u, OutcomeV1::Entry { node });
                Completed::Entry(entry)
            }
            IntentV1::Remove {
                parent,
                name,
                before,
            } => {
                if let ProbeV1::Present(victim) = before {
                    self.nodes.unhint(&self.local_key(victim), *parent, name, u);
                }
                self.settle_again(u, OutcomeV1::Done);
                Completed::Done
            }
            IntentV1::Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
                dst,
                ..
            } => {
                if let (Ok(p), Ok(np)) = (self.nodes.get(*parent), self.nodes.get(*newparent)) {
                    let dst = match dst {
                        ProbeV1::Present(d) => ProbeV1::Present(self.local_key(d).into()),
                        other => *other,
                    };
                    self.renamed(
                        &p,
                        OsStr::from_bytes(name),
                        &np,
                        OsStr::from_bytes(newname),
                        *flags,
                        Some(dst),
                        u,
                    );
                }
                self.settle_again(u, OutcomeV1::Done);
                Completed::Done
            }
            IntentV1::Xattr { .. } => {
                self.settle_again(u, OutcomeV1::Done);
                Completed::Done
            }
            IntentV1::Append { .. } => return None,
        };
        tracing::debug!(
            unique = u,
            "a resent request had taken effect before its outcome was recorded"
        );
        Some(answer)
    }

    /// The key a predecessor recorded, as this appliance's nodes have it: the same
    /// object, reached through this appliance's own mount of the export (a
    /// predecessor's mount ids are not this one's).
    fn local_key(&self, k: &crate::snapshot::KeyV1) -> crate::inode::InodeKey {
        crate::inode::InodeKey {
            dev: k.dev,
            ino: k.ino,
            mnt_id: self.nodes.root().key.mnt_id,
        }
    }

    /// Records the outcome of a request answered from its trace.
    fn settle_again(&self, u: u64, o: OutcomeV1) {
        if let Some(j) = &self.recovery {
            j.recorder.record(u, vec![OpV1::Outcome(o)]);
        }
    }

    /// The node of what `name` in `parent` is now: one the request already counted, or
    /// one looked up (and counted) now.
    fn counted_or_looked_up(&self, u: u64, trace: &Trace, parent: u64, name: &[u8]) -> Option<u64> {
        let p = self.nodes.get(parent).ok()?;
        let c = std::ffi::CString::new(name).ok()?;
        let key = key_of(&sys::statx_at(p.fd(), &c, STATX_MASK).ok()?);
        if let Some((id, _)) = trace
            .counted()
            .find(|(id, _)| self.nodes.get(*id).is_ok_and(|n| n.key.same_object(&key)))
        {
            return Some(id);
        }
        self.do_lookup(&p, OsStr::from_bytes(name), u)
            .ok()
            .map(|e| e.ino)
    }

    /// A handle the request opened on `node` that is still open.
    fn handles_of(&self, trace: &Trace, node: u64) -> Option<u64> {
        trace
            .opened
            .iter()
            .copied()
            .find(|&fh| self.handles.get(fh).is_ok_and(|h| h.owner().id == node))
    }

    /// Opens a file CREATE made (before its appliance died) as CREATE would have:
    /// its flags without creation or truncation.
    fn open_created(&self, u: u64, node: u64, flags: u32) -> Option<u64> {
        let n = self.nodes.get(node).ok()?;
        let fd = self
            .reopen(
                n.fd(),
                flags as i32 & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC),
            )
            .ok()?;
        Some(
            self.add_handle(u, Handle::file(fd, n, flags), |fh| OutcomeV1::Created {
                node,
                fh,
            }),
        )
    }

    /// A resent O_APPEND write whose first execution may have taken effect: the file
    /// had `size` bytes before it. If the file now holds `data` (or a part of it, a
    /// write cut short) after those bytes, it did: the rest is appended and the write
    /// counts as done. None: it did not; it runs again.
    pub(crate) fn resent_append(
        &self,
        u: u64,
        h: &Handle,
        data: &[u8],
    ) -> fsva_appliance::Result<Option<u32>> {
        let Some(size) = self
            .recovery
            .as_ref()
            .and_then(|j| lock(&j.appends).remove(&u))
        else {
            return Ok(None);
        };
        let now = sys::statx_fd(h.fd(), libc::STATX_SIZE, 0)?.stx_size;
        let Some(have) = now.checked_sub(size) else {
            return Ok(None);
        };
        let have = (have as usize).min(data.len());
        if have == 0 {
            return Ok(None);
        }
        let mut there = Vec::with_capacity(have);
        // The handle may be write-only: read through a descriptor of its own.
        let reader = self.reopen(h.fd(), libc::O_RDONLY)?;
        fsva_appliance::fileio::read_at_into(reader.as_fd(), size, have, &mut there)?;
        if there != data[..have] {
            return Ok(None);
        }
        if have < data.len() {
            // On an O_APPEND descriptor the offset is ignored: this lands at the end.
            Self::pwrite_all(h.fd(), now, &data[have..])?;
        }
        tracing::debug!(
            unique = u,
            bytes = data.len(),
            already = have,
            "a resent append had taken effect"
        );
        Ok(Some(data.len() as u32))
    }
}

impl Present for PassthroughFs {
    fn name(&self, parent: u64, name: &[u8]) -> ProbeV1 {
        let (Ok(p), Ok(c)) = (self.nodes.get(parent), std::ffi::CString::new(name)) else {
            return ProbeV1::Unknown;
        };
        self.probe(p.fd(), &c)
    }

    fn has_xattr(&self, node: u64, name: &[u8]) -> Option<bool> {
        let n = self.nodes.get(node).ok()?;
        let c = std::ffi::CString::new(name).ok()?;
        self.has_xattr_now(&n, &c)
    }
}

/// The names nodes may have now because of a rename whose outcome (and new hint) was
/// not recorded: the source's object may be at the target, and for an exchange the
/// target's at the source.
fn renamed_maybe(
    snap: &snapshot::SnapshotV1,
    traces: &Traces,
) -> HashMap<u64, Vec<(u64, Vec<u8>)>> {
    let mut moves: Vec<(crate::snapshot::KeyV1, (u64, Vec<u8>))> = Vec::new();
    for t in traces.unsettled() {
        if let Some(IntentV1::Rename {
            parent,
            name,
            newparent,
            newname,
            flags,
            src,
            dst,
        }) = &t.intent
        {
            if let ProbeV1::Present(k) = src {
                moves.push((*k, (*newparent, newname.clone())));
            }
            if let (ProbeV1::Present(k), true) = (dst, flags & libc::RENAME_EXCHANGE != 0) {
                moves.push((*k, (*parent, name.clone())));
            }
        }
    }
    let mut alt: HashMap<u64, Vec<(u64, Vec<u8>)>> = HashMap::new();
    if moves.is_empty() {
        return alt;
    }
    for n in &snap.nodes {
        for (k, to) in &moves {
            if (k.dev, k.ino) == (n.key.dev, n.key.ino) && n.id != to.0 {
                alt.entry(n.id).or_default().push(to.clone());
            }
        }
    }
    alt
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

//! FUSE passthrough from the appliance's side: asking for a backing id for a file a
//! backend opened, and giving it back on release.
//!
//! Registering needs CAP_SYS_ADMIN in the initial user namespace, which an appliance
//! never holds, so the runtime asks the supervisor ([`BackingFiles`], implemented over
//! the control link by the appliance entry point). This module only tracks which open
//! handle holds which id; it never decides whether a file may be registered.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

/// Something that can register backing files with the kernel for this mount.
pub trait BackingFiles: Send + Sync {
    /// Registers `file` and returns its backing id.
    fn open(&self, file: BorrowedFd<'_>) -> std::io::Result<i32>;
    /// Drops a backing id.
    fn close(&self, id: i32);

    /// Registers `files` as spares for new files' first opens, and reports earlier
    /// spares that now back files (`claimed`): for each file, its id or the error it was
    /// refused with. Unsupported unless overridden.
    fn open_spares(
        &self,
        files: &[BorrowedFd<'_>],
        claimed: &[i32],
    ) -> std::io::Result<Vec<std::io::Result<i32>>> {
        let _ = (files, claimed);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Backing ids held by open file handles. The kernel allows one backing file per
/// inode (every passthrough open of an inode must name the same id; it opens its own
/// backing file with each open's flags), so ids are per inode, counted by handle.
#[derive(Default)]
pub struct BackingIds {
    inner: Mutex<Inner>,
    /// Where every change is recorded for crash recovery, in the order it happened.
    journal: Option<std::sync::Arc<crate::journal::Journal>>,
}

impl std::fmt::Debug for BackingIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackingIds")
            .field("inner", &self.inner)
            .field("journaled", &self.journal.is_some())
            .finish()
    }
}

/// The runtime's own journal records (tag [`crate::journal::RUNTIME`]): backing-id
/// changes. Replaying one twice changes nothing, so a checkpoint that already holds a
/// change and a replay of its record agree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RuntimeRecord {
    V1(RuntimeRecordV1),
}

impl RuntimeRecord {
    /// A runtime record's payload (after its tag byte), in the newest version's terms.
    pub fn decode(payload: &[u8]) -> Result<RuntimeRecordV1, crate::state::StateError> {
        match postcard::from_bytes::<RuntimeRecord>(payload) {
            Ok(RuntimeRecord::V1(r)) => Ok(r),
            Err(e) => Err(crate::state::StateError::Corrupt(format!(
                "a runtime journal record: {e}"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RuntimeRecordV1 {
    BackingAcquired { ino: u64, fh: u64, id: i32 },
    BackingReleased { fh: u64 },
}

#[derive(Debug, Default)]
struct Inner {
    /// inode → (backing id, open handles using it)
    by_inode: HashMap<u64, (i32, usize)>,
    /// handle → inode
    by_handle: HashMap<u64, u64>,
}

impl BackingIds {
    /// A table that records every change in `journal`.
    pub fn journaled(journal: std::sync::Arc<crate::journal::Journal>) -> Self {
        Self {
            inner: Mutex::default(),
            journal: Some(journal),
        }
    }

    fn record(&self, r: RuntimeRecordV1) {
        if let Some(j) = &self.journal {
            let bytes = postcard::to_extend(&RuntimeRecord::V1(r), vec![crate::journal::RUNTIME])
                .expect("a runtime record always encodes");
            if let Err(e) = j.append(&bytes) {
                tracing::error!(error = %e, "recording a backing-file change failed");
            }
        }
    }

    /// The backing id for a new handle `fh` of `ino`: the inode's existing one, or one
    /// made by `register` (called with the table locked, so an inode never gets two).
    /// A handle that holds one already (a resent OPEN) gets it again, counted once.
    pub fn acquire(
        &self,
        ino: u64,
        fh: u64,
        register: impl FnOnce() -> std::io::Result<i32>,
    ) -> std::io::Result<i32> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&held) = t.by_handle.get(&fh) {
            if held == ino {
                if let Some(&(id, _)) = t.by_inode.get(&ino) {
                    return Ok(id);
                }
            }
        }
        let id = match t.by_inode.get_mut(&ino) {
            Some((id, users)) => {
                *users += 1;
                *id
            }
            None => {
                let id = register()?;
                t.by_inode.insert(ino, (id, 1));
                id
            }
        };
        t.by_handle.insert(fh, ino);
        self.record(RuntimeRecordV1::BackingAcquired { ino, fh, id });
        Ok(id)
    }

    /// Releases handle `fh`; returns the id to close when it was the inode's last user.
    pub fn release(&self, fh: u64) -> Option<i32> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ino = t.by_handle.remove(&fh)?;
        self.record(RuntimeRecordV1::BackingReleased { fh });
        let (id, users) = t.by_inode.get_mut(&ino)?;
        *users -= 1;
        if *users == 0 {
            let id = *id;
            t.by_inode.remove(&ino);
            Some(id)
        } else {
            None
        }
    }

    /// Inodes with a registered backing file.
    /// Every registration with the handles holding it (for a restart's state).
    pub fn export(&self) -> Vec<crate::state::BackingV1> {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<crate::state::BackingV1> = t
            .by_inode
            .iter()
            .map(|(&ino, &(id, _))| crate::state::BackingV1 {
                ino,
                id,
                handles: Vec::new(),
            })
            .collect();
        for (&fh, &ino) in &t.by_handle {
            if let Some(b) = out.iter_mut().find(|b| b.ino == ino) {
                b.handles.push(fh);
            }
        }
        out
    }

    /// Takes over a predecessor's registrations (the ids are the connection's, so they
    /// stay valid across appliances).
    pub fn import(&self, entries: &[crate::state::BackingV1]) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for b in entries {
            let handles: std::collections::BTreeSet<u64> = b
                .handles
                .iter()
                .copied()
                .filter(|fh| !t.by_handle.contains_key(fh))
                .collect();
            if handles.is_empty() || t.by_inode.contains_key(&b.ino) {
                continue;
            }
            t.by_inode.insert(b.ino, (b.id, handles.len()));
            for fh in handles {
                t.by_handle.insert(fh, b.ino);
            }
        }
    }

    /// Applies a journal record of a predecessor (crash recovery). Records a
    /// checkpoint already holds change nothing; a record naming an id other than the
    /// inode's is ignored (the kernel pins one backing file per inode).
    pub fn replay(&self, r: &RuntimeRecordV1) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match *r {
            RuntimeRecordV1::BackingAcquired { ino, fh, id } => {
                if t.by_handle.contains_key(&fh) {
                    return;
                }
                match t.by_inode.get_mut(&ino) {
                    Some((held, users)) if *held == id => *users += 1,
                    Some(_) => return,
                    None => {
                        t.by_inode.insert(ino, (id, 1));
                    }
                }
                t.by_handle.insert(fh, ino);
            }
            RuntimeRecordV1::BackingReleased { fh } => {
                let Some(ino) = t.by_handle.remove(&fh) else {
                    return;
                };
                if let Some((_, users)) = t.by_inode.get_mut(&ino) {
                    *users -= 1;
                    if *users == 0 {
                        t.by_inode.remove(&ino);
                    }
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_inode
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_id_per_inode_closed_with_its_last_handle() {
        let ids = BackingIds::default();
        let mut made = 0;
        let mut reg = || {
            made += 1;
            Ok(40 + made)
        };
        assert_eq!(ids.acquire(7, 100, &mut reg).unwrap(), 41);
        assert_eq!(
            ids.acquire(7, 101, &mut reg).unwrap(),
            41,
            "same inode, same id"
        );
        assert_eq!(ids.acquire(8, 102, &mut reg).unwrap(), 42);
        assert_eq!(ids.release(100), None, "another handle still uses it");
        assert_eq!(ids.release(101), Some(41));
        assert_eq!(ids.release(102), Some(42));
        assert_eq!(ids.release(102), None, "unknown handles are ignored");
        assert!(ids.is_empty());
    }
}

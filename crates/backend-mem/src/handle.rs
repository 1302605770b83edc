//! Open file and directory handles (`fh` values).
//!
//! A handle remembers its inode and, for regular files, holds the file's memfd so data
//! operations reach it without touching the inode table (and so the memfd is at hand to
//! become a passthrough backing file). This module owns fh allocation only; it must
//! never change inode open counts itself (the caller does, under the same lock).

use std::collections::HashMap;
use std::sync::Arc;

use fsva_appliance::{Errno, Result};

use crate::data::FileData;

#[derive(Debug, Clone)]
pub struct Handle {
    pub ino: u64,
    /// The memfd of a regular file; `None` for directories.
    pub data: Option<Arc<FileData>>,
    /// open(2) flags the handle was opened with.
    pub flags: u32,
}

#[derive(Debug, Default)]
pub struct HandleTable {
    map: HashMap<u64, Handle>,
    next: u64,
    /// Handles opened and closed since the recovery journal last recorded them
    /// (`None`: no journal is kept).
    changes: Option<(Vec<u64>, Vec<u64>)>,
    /// Handles below this number belonged to a file system that was lost: ESTALE.
    stale_below: u64,
}

impl HandleTable {
    /// Every handle and the last number handed out (for a snapshot).
    pub(crate) fn parts(&self) -> (u64, impl Iterator<Item = (&u64, &Handle)>) {
        (self.next, self.map.iter())
    }

    /// A table rebuilt from a snapshot's parts.
    pub(crate) fn from_parts(next: u64, map: HashMap<u64, Handle>) -> Option<HandleTable> {
        map.keys().all(|&k| k <= next).then_some(HandleTable {
            map,
            next,
            changes: None,
            stale_below: 0,
        })
    }

    /// Numbers after `base` for new handles; every lower one is stale.
    pub(crate) fn after_loss(&mut self, base: u64) {
        self.next = self.next.max(base);
        self.stale_below = base;
    }

    /// Starts recording opens and closes for the recovery journal.
    pub(crate) fn track(&mut self) {
        self.changes.get_or_insert_with(Default::default);
    }

    /// (opened, closed) since the last call.
    pub(crate) fn take_changes(&mut self) -> (Vec<u64>, Vec<u64>) {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The last number handed out.
    pub(crate) fn last(&self) -> u64 {
        self.next
    }

    /// The handle `fh`, whatever its inode (for the journal).
    pub(crate) fn peek(&self, fh: u64) -> Option<&Handle> {
        self.map.get(&fh)
    }

    /// Puts `h` under `fh` (replay of a journal record); false if it exists.
    pub(crate) fn put(&mut self, fh: u64, h: Handle) -> bool {
        if fh == 0 || self.map.contains_key(&fh) {
            return false;
        }
        self.next = self.next.max(fh);
        self.map.insert(fh, h);
        true
    }

    /// Removes `fh` whatever its inode (replay).
    pub(crate) fn drop_handle(&mut self, fh: u64) -> Option<Handle> {
        self.map.remove(&fh)
    }

    pub fn insert(&mut self, h: Handle) -> u64 {
        self.next += 1;
        self.map.insert(self.next, h);
        if let Some((opened, _)) = &mut self.changes {
            opened.push(self.next);
        }
        self.next
    }

    /// The handle, checked to belong to `ino` (EBADF otherwise).
    pub fn get(&self, fh: u64, ino: u64) -> Result<&Handle> {
        match self.map.get(&fh) {
            Some(h) if h.ino == ino => Ok(h),
            None if fh < self.stale_below => Err(Errno(libc::ESTALE)),
            _ => Err(Errno(libc::EBADF)),
        }
    }

    /// The memfd of file handle `fh` on `ino`.
    pub fn data(&self, fh: u64, ino: u64) -> Result<Arc<FileData>> {
        self.get(fh, ino)?.data.clone().ok_or(Errno(libc::EBADF))
    }

    pub fn remove(&mut self, fh: u64, ino: u64) -> Result<Handle> {
        self.get(fh, ino)?;
        if let Some((_, closed)) = &mut self.changes {
            closed.push(fh);
        }
        self.map.remove(&fh).ok_or(Errno(libc::EBADF))
    }
}

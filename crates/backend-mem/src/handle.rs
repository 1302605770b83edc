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
}

impl HandleTable {
    /// Every handle and the last number handed out (for a snapshot).
    pub(crate) fn parts(&self) -> (u64, impl Iterator<Item = (&u64, &Handle)>) {
        (self.next, self.map.iter())
    }

    /// A table rebuilt from a snapshot's parts.
    pub(crate) fn from_parts(next: u64, map: HashMap<u64, Handle>) -> Option<HandleTable> {
        map.keys()
            .all(|&k| k <= next)
            .then_some(HandleTable { map, next })
    }

    pub fn insert(&mut self, h: Handle) -> u64 {
        self.next += 1;
        self.map.insert(self.next, h);
        self.next
    }

    /// The handle, checked to belong to `ino` (EBADF otherwise).
    pub fn get(&self, fh: u64, ino: u64) -> Result<&Handle> {
        match self.map.get(&fh) {
            Some(h) if h.ino == ino => Ok(h),
            _ => Err(Errno(libc::EBADF)),
        }
    }

    /// The memfd of file handle `fh` on `ino`.
    pub fn data(&self, fh: u64, ino: u64) -> Result<Arc<FileData>> {
        self.get(fh, ino)?.data.clone().ok_or(Errno(libc::EBADF))
    }

    pub fn remove(&mut self, fh: u64, ino: u64) -> Result<Handle> {
        self.get(fh, ino)?;
        self.map.remove(&fh).ok_or(Errno(libc::EBADF))
    }
}

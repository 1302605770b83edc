//! The inode table: every live object, its metadata, and its lifetime.
//!
//! Inode numbers are node ids: allocated monotonically from 1 (the root), never
//! reused, generation 0. An inode lives while it has a name (`nlink > 0`), a kernel
//! lookup reference, or an open handle; the table frees it the moment all three are
//! gone ([`InodeTable::release_if_unused`]). This module owns that rule and the
//! per-inode fields; it must never perform data I/O or take locks (the caller holds
//! the metadata lock around every call).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fsva_appliance::{Errno, Result};

use crate::attr::{Meta, Time};
use crate::data::FileData;
use crate::dir::Dir;
use crate::xattr::Xattrs;

pub const ROOT: u64 = 1;

/// What kind of object an inode is, with its type-specific contents.
#[derive(Debug)]
pub enum Kind {
    /// A regular file; the memfd is created when it is first opened or resized.
    File(Option<Arc<FileData>>),
    Dir(Dir),
    Symlink(Vec<u8>),
    /// FIFO, socket, character or block device: metadata only.
    Special,
}

#[derive(Debug)]
pub struct Inode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub btime: Time,
    /// Kernel lookup references (atomic so lookups can be counted under a read lock;
    /// it only ever drops to zero under the write lock, in `forget`).
    pub lookups: AtomicU64,
    /// Open file and directory handles.
    pub opens: u64,
    pub kind: Kind,
    pub xattrs: Xattrs,
    /// The memfd's ctime when we last brought our times in line with it: a later one
    /// means the kernel wrote the memfd directly (FUSE passthrough) since.
    pub(crate) data_ctime_seen: Time,
}

impl Inode {
    pub fn new(mode: u32, uid: u32, gid: u32, kind: Kind) -> Inode {
        let now = Time::now();
        Inode {
            data_ctime_seen: Time::default(),
            mode,
            uid,
            gid,
            nlink: 1,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            lookups: AtomicU64::new(0),
            opens: 0,
            kind,
            xattrs: Xattrs::default(),
        }
    }

    /// atime, mtime, ctime, btime and the memfd ctime last seen, as states save them.
    pub(crate) fn saved_times(&self) -> [(i64, u32); 5] {
        [
            self.atime,
            self.mtime,
            self.ctime,
            self.btime,
            self.data_ctime_seen,
        ]
        .map(|t| (t.sec, t.nsec))
    }

    /// Sets the times [`Inode::saved_times`] gave.
    pub(crate) fn restore_times(&mut self, times: [(i64, u32); 5]) {
        let [a, m, c, b, d] = times.map(|(sec, nsec)| Time { sec, nsec });
        (
            self.atime,
            self.mtime,
            self.ctime,
            self.btime,
            self.data_ctime_seen,
        ) = (a, m, c, b, d);
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }

    pub fn dir(&self) -> Result<&Dir> {
        match &self.kind {
            Kind::Dir(d) => Ok(d),
            _ => Err(Errno(libc::ENOTDIR)),
        }
    }

    pub fn dir_mut(&mut self) -> Result<&mut Dir> {
        match &mut self.kind {
            Kind::Dir(d) => Ok(d),
            _ => Err(Errno(libc::ENOTDIR)),
        }
    }

    pub fn data(&self) -> Option<&Arc<FileData>> {
        match &self.kind {
            Kind::File(d) => d.as_ref(),
            _ => None,
        }
    }

    pub fn touch_mc(&mut self, now: Time) {
        self.mtime = now;
        self.ctime = now;
        self.mirror_mtime();
    }

    /// Records the memfd's ctime as seen (after we changed our times ourselves).
    pub fn note_data_times(&mut self) {
        if let Kind::File(Some(d)) = &self.kind {
            if let Some((_, c)) = d.times() {
                self.data_ctime_seen = c;
            }
        }
    }

    /// Takes in times the memfd gained from writes that bypassed us (FUSE passthrough),
    /// before changing them.
    pub fn absorb_data_times(&mut self) {
        if let Kind::File(Some(d)) = &self.kind {
            if let Some((m, c)) = d.times() {
                self.mtime = self.mtime.max(m);
                if c > self.data_ctime_seen {
                    self.ctime = self.ctime.max(c);
                    self.data_ctime_seen = c;
                }
            }
        }
    }

    /// Copies a regular file's mtime onto its memfd (see `FileData::times`).
    pub fn mirror_mtime(&mut self) {
        if let Kind::File(Some(d)) = &self.kind {
            d.set_mtime(self.mtime);
        }
        self.note_data_times();
    }

    /// Attribute values for a reply (file size and blocks come from the memfd).
    pub fn meta(&self, ino: u64) -> Meta {
        let (size, blocks) = match &self.kind {
            Kind::File(Some(d)) => d.stat().unwrap_or((0, 0)),
            Kind::File(None) | Kind::Special => (0, 0),
            Kind::Dir(d) => (4096 + 32 * d.len() as u64 / 4096 * 4096, 8),
            Kind::Symlink(t) => (t.len() as u64, 0),
        };
        // Writes through FUSE passthrough reach only the memfd: its times are newer then.
        let (mut mtime, mut ctime) = (self.mtime, self.ctime);
        if let Kind::File(Some(d)) = &self.kind {
            if let Some((m, c)) = d.times() {
                mtime = mtime.max(m);
                if c > self.data_ctime_seen {
                    ctime = ctime.max(c);
                }
            }
        }
        Meta {
            ino,
            mode: self.mode,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            size,
            blocks,
            atime: self.atime,
            mtime,
            ctime,
            btime: self.btime,
        }
    }

    pub(crate) fn unused(&self) -> bool {
        self.nlink == 0 && self.opens == 0 && self.lookups.load(Ordering::Relaxed) == 0
    }
}

#[derive(Debug)]
pub struct InodeTable {
    map: HashMap<u64, Inode>,
    next: u64,
    /// What changed since the recovery journal last recorded it (`None`: no journal).
    changes: Option<Changes>,
    /// Numbers below this one (but the root) belonged to a file system that was lost:
    /// asking for one is ESTALE, not ENOENT (0: none).
    stale_below: u64,
}

/// Inodes touched and freed since the last journal record.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub touched: Vec<u64>,
    pub freed: Vec<u64>,
}

impl InodeTable {
    /// A table holding only the root directory.
    pub fn new(root: Inode) -> InodeTable {
        let mut map = HashMap::new();
        map.insert(ROOT, root);
        InodeTable {
            map,
            next: ROOT + 1,
            changes: None,
            stale_below: 0,
        }
    }

    /// Numbers from `base` on for new inodes; every lower one but the root is stale
    /// (a file system that was lost and replaced by this empty one).
    pub(crate) fn after_loss(&mut self, base: u64) {
        self.next = self.next.max(base);
        self.stale_below = base;
    }

    fn missing(&self, ino: u64) -> Errno {
        if ino < self.stale_below {
            Errno(libc::ESTALE)
        } else {
            Errno::ENOENT
        }
    }

    /// Starts recording changes for the recovery journal (every directory too).
    pub(crate) fn track(&mut self) {
        self.changes.get_or_insert_with(Changes::default);
        for inode in self.map.values_mut() {
            if let Kind::Dir(d) = &mut inode.kind {
                d.track();
            }
        }
    }

    /// The changes since the last call (none when not tracking).
    pub(crate) fn take_changes(&mut self) -> Option<Changes> {
        self.changes.as_mut().map(std::mem::take)
    }

    /// The inode, for the journal's commit and replay (no change recorded).
    pub(crate) fn get_untracked(&mut self, ino: u64) -> Option<&mut Inode> {
        self.map.get_mut(&ino)
    }

    /// Puts `inode` under `ino` (replay of a journal record); false if `ino` is the
    /// counter's or beyond it.
    pub(crate) fn put(&mut self, ino: u64, inode: Inode) -> bool {
        if ino == 0 || ino >= self.next {
            return false;
        }
        self.map.insert(ino, inode);
        true
    }

    /// Removes `ino` (replay of a journal record); never the root.
    pub(crate) fn remove(&mut self, ino: u64) -> Option<Inode> {
        if ino == ROOT {
            return None;
        }
        self.map.remove(&ino)
    }

    /// The next number to hand out.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// Moves the counter forward (replay); never back.
    pub(crate) fn advance(&mut self, next: u64) {
        self.next = self.next.max(next);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true: the root lives as long as the table.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, ino: u64) -> Result<&Inode> {
        self.map.get(&ino).ok_or_else(|| self.missing(ino))
    }

    pub fn get_mut(&mut self, ino: u64) -> Result<&mut Inode> {
        if let Some(c) = &mut self.changes {
            c.touched.push(ino);
        }
        let missing = self.missing(ino);
        self.map.get_mut(&ino).ok_or(missing)
    }

    /// Adds an inode under a fresh number.
    pub fn insert(&mut self, mut inode: Inode) -> u64 {
        let ino = self.next;
        self.next += 1;
        if let Some(c) = &mut self.changes {
            c.touched.push(ino);
            if let Kind::Dir(d) = &mut inode.kind {
                d.track();
            }
        }
        self.map.insert(ino, inode);
        ino
    }

    /// Every inode and the next number to hand out (for a snapshot).
    pub(crate) fn parts(&self) -> (u64, impl Iterator<Item = (&u64, &Inode)>) {
        (self.next, self.map.iter())
    }

    /// A table rebuilt from a snapshot's parts (the root must be among them).
    pub(crate) fn from_parts(next: u64, map: HashMap<u64, Inode>) -> Option<InodeTable> {
        (map.contains_key(&ROOT) && map.keys().all(|&k| k < next)).then_some(InodeTable {
            map,
            next,
            changes: None,
            stale_below: 0,
        })
    }

    /// Frees `ino` if nothing refers to it any more (never the root). Returns the freed
    /// inode so its contents (a memfd) are dropped outside the lock by the caller.
    pub fn release_if_unused(&mut self, ino: u64) -> Option<Inode> {
        if ino == ROOT {
            return None;
        }
        if self.map.get(&ino).is_some_and(Inode::unused) {
            if let Some(c) = &mut self.changes {
                c.freed.push(ino);
            }
            self.map.remove(&ino)
        } else {
            None
        }
    }
}

//! Directory contents: names to inode numbers, with stable readdir cookies.
//!
//! Every entry gets a per-directory, monotonically increasing cookie when it is added;
//! readdir positions are cookies, so entries added or removed during an iteration never
//! cause another entry to be skipped or repeated. Cookies 0 and 1 are `.` and `..`.
//! This module owns only the name table: it must never touch inodes, link counts or times.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use serde::{Deserialize, Serialize};

/// Cookie of `.`.
pub const DOT: u64 = 0;
/// Cookie of `..`.
pub const DOTDOT: u64 = 1;
/// Cookie of the first real entry.
const FIRST: u64 = 2;

#[derive(Debug)]
pub struct Dir {
    /// The inode number of the parent (`..`); the root is its own parent.
    pub parent: u64,
    by_cookie: BTreeMap<u64, (OsString, u64)>,
    by_name: HashMap<OsString, u64>,
    next: u64,
    /// Changes not yet in the recovery journal (`None`: no journal is kept).
    log: Option<Vec<DirOp>>,
}

/// One change to a directory's entries, as the recovery journal records it. Replayed
/// in order on the same directory, they give the same entries with the same cookies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirOp {
    Insert(Vec<u8>, u64),
    Set(Vec<u8>, u64),
    Remove(Vec<u8>),
}

impl Dir {
    pub fn new(parent: u64) -> Dir {
        Dir {
            parent,
            by_cookie: BTreeMap::new(),
            by_name: HashMap::new(),
            next: FIRST,
            log: None,
        }
    }

    /// Starts recording changes for the recovery journal.
    pub(crate) fn track(&mut self) {
        self.log.get_or_insert_with(Vec::new);
    }

    /// The changes since the last call.
    pub(crate) fn take_log(&mut self) -> Vec<DirOp> {
        match &mut self.log {
            Some(l) => std::mem::take(l),
            None => Vec::new(),
        }
    }

    fn note(&mut self, op: impl FnOnce() -> DirOp) {
        if let Some(l) = &mut self.log {
            l.push(op());
        }
    }

    /// Replays a journal record's change; false (and nothing changed) when it does not
    /// fit this directory (a name inserted twice, or removed while absent).
    pub(crate) fn apply(&mut self, op: &DirOp) -> bool {
        match op {
            DirOp::Insert(name, ino) => {
                let name = OsStr::from_bytes(name);
                if self.by_name.contains_key(name) {
                    return false;
                }
                self.insert(name, *ino);
            }
            DirOp::Set(name, ino) => self.set(OsStr::from_bytes(name), *ino),
            DirOp::Remove(name) => {
                if self.remove(OsStr::from_bytes(name)).is_none() {
                    return false;
                }
            }
        }
        true
    }

    /// Every entry as (cookie, name, inode), and the next cookie (for a snapshot).
    pub(crate) fn parts(&self) -> (u64, impl Iterator<Item = (&u64, &(OsString, u64))>) {
        (self.next, self.by_cookie.iter())
    }

    /// A directory rebuilt from a snapshot's parts (entries in cookie order, as
    /// [`Dir::parts`] gives them); `None` if cookies are out of order or range, or a
    /// name repeats.
    pub(crate) fn from_parts(
        parent: u64,
        next: u64,
        entries: Vec<(u64, OsString, u64)>,
    ) -> Option<Dir> {
        let ordered = entries.windows(2).all(|w| w[0].0 < w[1].0);
        let in_range = entries.iter().all(|e| e.0 >= FIRST && e.0 < next);
        if !(ordered && in_range) {
            return None;
        }
        let mut by_name = HashMap::with_capacity(entries.len());
        for (cookie, name, _) in &entries {
            if by_name.insert(name.clone(), *cookie).is_some() {
                return None;
            }
        }
        // Sorted input: the tree is built in one pass.
        let by_cookie = entries
            .into_iter()
            .map(|(c, name, ino)| (c, (name, ino)))
            .collect();
        Some(Dir {
            parent,
            by_cookie,
            by_name,
            next,
            log: None,
        })
    }

    /// The inode number behind `name`.
    pub fn get(&self, name: &OsStr) -> Option<u64> {
        self.by_name.get(name).map(|c| self.by_cookie[c].1)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Adds `name` (which must not exist) with a fresh cookie.
    pub fn insert(&mut self, name: &OsStr, ino: u64) {
        debug_assert!(!self.by_name.contains_key(name));
        let c = self.next;
        self.next += 1;
        self.by_cookie.insert(c, (name.to_owned(), ino));
        self.by_name.insert(name.to_owned(), c);
        self.note(|| DirOp::Insert(name.as_bytes().to_vec(), ino));
    }

    /// Points an existing `name` at `ino`, keeping its cookie (the name existed throughout).
    /// Adds it when missing.
    pub fn set(&mut self, name: &OsStr, ino: u64) {
        match self.by_name.get(name) {
            Some(c) => {
                if let Some(e) = self.by_cookie.get_mut(c) {
                    e.1 = ino;
                }
                self.note(|| DirOp::Set(name.as_bytes().to_vec(), ino));
            }
            None => self.insert(name, ino),
        }
    }

    /// Removes `name`, returning the inode it named.
    pub fn remove(&mut self, name: &OsStr) -> Option<u64> {
        let c = self.by_name.remove(name)?;
        self.note(|| DirOp::Remove(name.as_bytes().to_vec()));
        self.by_cookie.remove(&c).map(|(_, ino)| ino)
    }

    /// Real entries (no `.`/`..`) whose cookie is `>= from`, in cookie order:
    /// `(cookie, name, ino)`.
    pub fn iter_from(&self, from: u64) -> impl Iterator<Item = (u64, &OsStr, u64)> {
        self.by_cookie
            .range(from.max(FIRST)..)
            .map(|(c, (n, i))| (*c, n.as_os_str(), *i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(d: &Dir, from: u64) -> Vec<String> {
        d.iter_from(from)
            .map(|(_, n, _)| n.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn cookies_are_stable_under_mutation() {
        let mut d = Dir::new(1);
        for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
            d.insert(OsStr::new(n), 10 + i as u64);
        }
        let first: Vec<_> = d.iter_from(0).take(2).map(|(c, _, _)| c).collect();
        let resume = first[1] + 1;
        d.remove(OsStr::new("a"));
        d.remove(OsStr::new("c"));
        d.insert(OsStr::new("e"), 20);
        // "d" existed throughout and is still found; "b" is not repeated.
        assert_eq!(names(&d, resume), vec!["d", "e"]);
        d.set(OsStr::new("d"), 30);
        assert_eq!(d.get(OsStr::new("d")), Some(30));
        assert_eq!(names(&d, resume), vec!["d", "e"]);
        assert_eq!(d.len(), 3);
    }
}

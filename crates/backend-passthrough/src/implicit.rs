//! Files opened without OPEN requests: FUSE's no-open mode.
//!
//! When OPEN answers ENOSYS, the kernel stops sending OPEN and RELEASE for files: an
//! open(2) then costs no round trip, and READ, WRITE, FSYNC, LSEEK, ... arrive with
//! `fh` 0. The kernel also keeps the file's cached pages across opens (as
//! `FOPEN_KEEP_CACHE`), which is only right for an export nothing else changes — a VM
//! appliance's own disk. Without ATOMIC_O_TRUNC (never asked), open(O_TRUNC) still
//! reaches the backend as a SETATTR.
//!
//! Directories are not this module's: OPENDIR answers ENOSYS too, and each READDIR
//! with `fh` 0 lists through a stream opened for it (offsets are the file system's
//! own cookies, which hold across opens).
//!
//! This module owns the one descriptor per node that serves those requests: opened
//! read-write on first use (read-only where the file refuses writing; a later WRITE
//! then gets the refusal), kept as an ordinary [`Handle`] so every handle path serves
//! it, and given back when the kernel forgets the node. It never decides whether the
//! mode is on, and never opens anything but through the opener it is handed.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use fsva_appliance::Errno;

use crate::handle::Handle;
use crate::inode::Node;

/// The `fh` of requests on files the kernel opened without OPEN.
pub const NO_HANDLE: u64 = 0;

/// One node's descriptor.
struct Implicit {
    handle: Arc<Handle>,
    /// Why it is read-only, when it is: what a WRITE through it gets.
    unwritable: Option<i32>,
    /// The first error an fsync through it met (see [`ImplicitOpens::synced`]).
    sync_failed: Option<Errno>,
}

/// The descriptors of files opened without OPEN, by node id.
#[derive(Default)]
pub struct ImplicitOpens {
    by_node: Mutex<HashMap<u64, Implicit>>,
}

impl ImplicitOpens {
    /// The handle serving `node`'s requests, opened with `open(flags)` if there is none
    /// yet. `write`: the request writes, so a read-only descriptor is an error.
    pub fn get(
        &self,
        node: Arc<Node>,
        write: bool,
        open: impl Fn(i32) -> io::Result<OwnedFd>,
    ) -> Result<Arc<Handle>, Errno> {
        if node.kind != libc::S_IFREG {
            // Directories are listed through a stream per request, never read here.
            return Err(Errno(libc::EBADF));
        }
        let mut g = self.by_node.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match g.entry(node.id) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let (fd, flags, unwritable) = match open(libc::O_RDWR) {
                    Ok(fd) => (fd, libc::O_RDWR, None),
                    Err(e) => match e.raw_os_error() {
                        Some(why @ (libc::EROFS | libc::EACCES | libc::EPERM)) => {
                            (open(libc::O_RDONLY)?, libc::O_RDONLY, Some(why))
                        }
                        _ => return Err(e.into()),
                    },
                };
                v.insert(Implicit {
                    handle: Arc::new(Handle::file(fd, node, flags as u32)),
                    unwritable,
                    sync_failed: None,
                })
            }
        };
        match (write, slot.unwritable) {
            (true, Some(why)) => Err(Errno(why)),
            _ => Ok(slot.handle.clone()),
        }
    }

    /// `fd`, just created and opened with `flags` (CREATE, TMPFILE), becomes `node`'s
    /// descriptor if it serves every later request as one opened by [`Self::get`] would
    /// (read-write, positioned, not synchronous: the kernel sends FSYNC for O_SYNC
    /// writers itself); otherwise it is closed and one is opened on first use.
    pub fn adopt(&self, node: Arc<Node>, fd: OwnedFd, flags: u32) {
        let flags = flags as i32;
        let unlike = libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC;
        if flags & libc::O_ACCMODE != libc::O_RDWR || flags & unlike != 0 {
            return;
        }
        let mut g = self.by_node.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(node.id).or_insert_with(|| Implicit {
            handle: Arc::new(Handle::file(fd, node, libc::O_RDWR as u32)),
            unwritable: None,
            sync_failed: None,
        });
    }

    /// What an FSYNC of node `id` through its descriptor answers, given the system
    /// call's result `r`. Linux reports a writeback error once per open file, and here
    /// one descriptor stands for every open of the file: so the first error is kept and
    /// answered to every later FSYNC, until the kernel forgets the node. Telling a
    /// writer its data is safe when it is not would be worse than failing again.
    pub fn synced(&self, id: u64, r: Result<(), Errno>) -> Result<(), Errno> {
        let mut g = self.by_node.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = g.get_mut(&id) else {
            return r;
        };
        if let Err(e) = r {
            slot.sync_failed.get_or_insert(e);
        }
        slot.sync_failed.map_or(r, Err)
    }

    /// The kernel forgot node `id`: its descriptor, if it had one, to be retired.
    pub fn forget(&self, id: u64) -> Option<Arc<Handle>> {
        let mut g = self.by_node.lock().unwrap_or_else(|p| p.into_inner());
        g.remove(&id).map(|i| i.handle)
    }

    /// Number of descriptors held; for tests and diagnostics.
    pub fn count(&self) -> usize {
        self.by_node.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inode::InodeKey;

    fn node(path: &std::path::Path, id: u64) -> Arc<Node> {
        let fd: OwnedFd = std::fs::File::open(path).unwrap().into();
        let key = InodeKey {
            dev: 0,
            ino: id,
            mnt_id: 0,
        };
        Arc::new(Node::new(id, fd, key, libc::S_IFREG, false))
    }

    #[test]
    fn a_failed_fsync_is_answered_to_every_later_one_until_the_node_is_forgotten() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let opens = ImplicitOpens::default();
        let n = node(&path, 7);
        let open = |flags: i32| -> io::Result<OwnedFd> {
            Ok(std::fs::OpenOptions::new()
                .read(true)
                .write(flags & libc::O_ACCMODE == libc::O_RDWR)
                .open(&path)?
                .into())
        };
        let h = opens.get(n.clone(), true, open).unwrap();
        // The same descriptor for every request on the node.
        assert!(Arc::ptr_eq(&h, &opens.get(n.clone(), false, open).unwrap()));
        assert_eq!(opens.synced(7, Ok(())), Ok(()));
        assert_eq!(
            opens.synced(7, Err(Errno(libc::EIO))),
            Err(Errno(libc::EIO))
        );
        // The system call would now succeed (the error was consumed): still EIO.
        assert_eq!(opens.synced(7, Ok(())), Err(Errno(libc::EIO)));
        assert_eq!(
            opens.synced(7, Err(Errno(libc::ENOSPC))),
            Err(Errno(libc::EIO))
        );
        assert!(opens.forget(7).is_some());
        assert_eq!(opens.count(), 0);
        let _ = opens.get(n, false, open).unwrap();
        assert_eq!(opens.synced(7, Ok(())), Ok(()));
    }
}

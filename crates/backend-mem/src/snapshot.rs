//! mem as a snapshot, and back: the whole file system (every inode with its metadata,
//! directory entries with their readdir cookies, symlink targets, xattrs and ACLs),
//! the kernel's lookup counts, the open handles, and file contents as the memfds
//! themselves, which travel beside the bytes by index (no copy, so a restart does not
//! grow with the data).
//!
//! One enum variant per version; a restore checks every cross-reference (descriptor
//! indexes, handle inodes, the root) and refuses a snapshot that does not hold
//! together. This module never takes the file system's lock itself (its caller does).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use fsva_appliance::state::{BackendState, StateError, StateFd};
use serde::{Deserialize, Serialize};

use crate::attr::Time;
use crate::data::{FileData, Space};
use crate::dir::Dir;
use crate::handle::{Handle, HandleTable};
use crate::inode::{Inode, InodeTable, Kind};
use crate::xattr::Xattrs;

#[derive(Debug, Serialize, Deserialize)]
enum MemSnapshot {
    V1(SnapshotV1),
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotV1 {
    capacity: u64,
    next_ino: u64,
    next_fh: u64,
    inodes: Vec<InodeV1>,
    handles: Vec<HandleV1>,
}

#[derive(Debug, Serialize, Deserialize)]
struct InodeV1 {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    rdev: u32,
    times: [(i64, u32); 5],
    lookups: u64,
    opens: u64,
    kind: KindV1,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Serialize, Deserialize)]
enum KindV1 {
    /// The index of the memfd among the snapshot's descriptors, and what it charged.
    File(Option<(u32, u64)>),
    Dir {
        parent: u64,
        next: u64,
        entries: Vec<(u64, Vec<u8>, u64)>,
    },
    Symlink(Vec<u8>),
    Special,
}

#[derive(Debug, Serialize, Deserialize)]
struct HandleV1 {
    fh: u64,
    ino: u64,
    data: Option<u32>,
    flags: u32,
}

fn t(time: Time) -> (i64, u32) {
    (time.sec, time.nsec)
}

fn time((sec, nsec): (i64, u32)) -> Time {
    Time { sec, nsec }
}

/// Snapshots `inodes` and `handles`, duplicating every memfd.
pub(crate) fn take(
    inodes: &InodeTable,
    handles: &HandleTable,
    space: &Space,
) -> Result<BackendState, StateError> {
    let mut fds: Vec<StateFd> = Vec::new();
    // One descriptor per memfd, whoever refers to it (inode and handles share one);
    // lent, not duplicated: the paused file system keeps them open while they are sent.
    let mut index: HashMap<*const FileData, u32> = HashMap::new();
    let mut fd_of = |d: &Arc<FileData>, fds: &mut Vec<StateFd>| -> Result<u32, StateError> {
        if let Some(&i) = index.get(&Arc::as_ptr(d)) {
            return Ok(i);
        }
        fds.push(StateFd::Lent(d.clone()));
        let i = (fds.len() - 1) as u32;
        index.insert(Arc::as_ptr(d), i);
        Ok(i)
    };
    let (next_ino, all) = inodes.parts();
    let mut out = Vec::new();
    for (&ino, inode) in all {
        let kind = match &inode.kind {
            Kind::File(None) => KindV1::File(None),
            Kind::File(Some(d)) => KindV1::File(Some((fd_of(d, &mut fds)?, d.charged()))),
            Kind::Dir(d) => {
                let (next, entries) = d.parts();
                KindV1::Dir {
                    parent: d.parent,
                    next,
                    entries: entries
                        .map(|(&c, (name, ino))| (c, name.as_bytes().to_vec(), *ino))
                        .collect(),
                }
            }
            Kind::Symlink(target) => KindV1::Symlink(target.clone()),
            Kind::Special => KindV1::Special,
        };
        out.push(InodeV1 {
            ino,
            mode: inode.mode,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.nlink,
            rdev: inode.rdev,
            times: [
                t(inode.atime),
                t(inode.mtime),
                t(inode.ctime),
                t(inode.btime),
                t(inode.data_ctime_seen),
            ],
            lookups: inode.lookups.load(std::sync::atomic::Ordering::SeqCst),
            opens: inode.opens,
            kind,
            xattrs: inode
                .xattrs
                .pairs()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
    }
    let (next_fh, hs) = handles.parts();
    let mut hout = Vec::new();
    for (&fh, h) in hs {
        hout.push(HandleV1 {
            fh,
            ino: h.ino,
            data: h.data.as_ref().map(|d| fd_of(d, &mut fds)).transpose()?,
            flags: h.flags,
        });
    }
    let snap = MemSnapshot::V1(SnapshotV1 {
        capacity: space.capacity(),
        next_ino,
        next_fh,
        inodes: out,
        handles: hout,
    });
    Ok(BackendState {
        bytes: postcard::to_allocvec(&snap).expect("in-memory snapshot always encodes"),
        fds,
    })
}

/// What a restore rebuilds.
pub(crate) struct Restored {
    pub inodes: InodeTable,
    pub handles: HandleTable,
}

/// Rebuilds the tables from `state`, charging restored data to `space`.
pub(crate) fn restore(state: BackendState, space: &Arc<Space>) -> Result<Restored, StateError> {
    let bad = |why: String| StateError::Backend(why);
    let snap: MemSnapshot =
        postcard::from_bytes(&state.bytes).map_err(|e| StateError::Corrupt(e.to_string()))?;
    let MemSnapshot::V1(s) = snap;
    // Counters near the end of their range would wrap (and reuse the root's number).
    const COUNTER_LIMIT: u64 = 1 << 62;
    if s.next_ino >= COUNTER_LIMIT || s.next_fh >= COUNTER_LIMIT {
        return Err(bad("inode or handle counter out of range".into()));
    }
    let count = state.fds.len();
    let mut slots: Vec<Option<StateFd>> = state.fds.into_iter().map(Some).collect();
    let mut data: HashMap<u32, Arc<FileData>> = HashMap::new();
    let mut file_data = |i: u32, charged: u64| -> Result<Arc<FileData>, StateError> {
        if let Some(d) = data.get(&i) {
            return Ok(d.clone());
        }
        let fd = slots
            .get_mut(i as usize)
            .and_then(Option::take)
            .ok_or(StateError::MissingDescriptor { index: i, count })?
            .into_owned()
            .map_err(|e| StateError::Backend(format!("taking over a memfd: {e}")))?;
        let d = Arc::new(FileData::restored(fd, charged, space.clone()));
        data.insert(i, d.clone());
        Ok(d)
    };
    space.set_capacity(s.capacity);
    let mut map = HashMap::with_capacity(s.inodes.len());
    for i in s.inodes {
        let kind = match i.kind {
            KindV1::File(None) => Kind::File(None),
            KindV1::File(Some((fd, charged))) => Kind::File(Some(file_data(fd, charged)?)),
            KindV1::Dir {
                parent,
                next,
                entries,
            } if next < COUNTER_LIMIT => Kind::Dir(
                Dir::from_parts(
                    parent,
                    next,
                    entries
                        .into_iter()
                        .map(|(c, n, ino)| (c, OsString::from_vec(n), ino))
                        .collect(),
                )
                .ok_or_else(|| bad(format!("directory {} has inconsistent entries", i.ino)))?,
            ),
            KindV1::Dir { .. } => {
                return Err(bad(format!("directory {} counter out of range", i.ino)))
            }
            KindV1::Symlink(target) => Kind::Symlink(target),
            KindV1::Special => Kind::Special,
        };
        let mut inode = Inode::new(i.mode, i.uid, i.gid, kind);
        inode.nlink = i.nlink;
        inode.rdev = i.rdev;
        inode.atime = time(i.times[0]);
        inode.mtime = time(i.times[1]);
        inode.ctime = time(i.times[2]);
        inode.btime = time(i.times[3]);
        inode.data_ctime_seen = time(i.times[4]);
        inode.lookups = AtomicU64::new(i.lookups);
        inode.opens = i.opens;
        inode.xattrs = Xattrs::from_pairs(i.xattrs);
        if map.insert(i.ino, inode).is_some() {
            return Err(bad(format!("inode {} appears twice", i.ino)));
        }
    }
    let mut hmap = HashMap::new();
    for h in s.handles {
        if !map.contains_key(&h.ino) {
            return Err(bad(format!(
                "handle {} refers to missing inode {}",
                h.fh, h.ino
            )));
        }
        let d = match h.data {
            Some(i) => Some(data.get(&i).cloned().ok_or_else(|| {
                bad(format!(
                    "handle {} refers to file data {i} no inode holds",
                    h.fh
                ))
            })?),
            None => None,
        };
        hmap.insert(
            h.fh,
            Handle {
                ino: h.ino,
                data: d,
                flags: h.flags,
            },
        );
    }
    let inodes = InodeTable::from_parts(s.next_ino, map)
        .ok_or_else(|| bad("no root, or inode numbers beyond the counter".into()))?;
    let handles = HandleTable::from_parts(s.next_fh, hmap)
        .ok_or_else(|| bad("handle numbers beyond the counter".into()))?;
    Ok(Restored { inodes, handles })
}

//! mem as a snapshot, and back: the whole file system (every inode with its metadata,
//! directory entries with their readdir cookies, symlink targets, xattrs and ACLs),
//! the kernel's lookup counts, the open handles, and file contents as the memfds
//! themselves, never copied, so a restart does not grow with the data.
//!
//! Two versions, one enum variant each:
//! - V1 (live restart without a journal): memfds are lent beside the bytes and named
//!   by their index among them;
//! - V2 (checkpoints for crash recovery): memfds are kept by the supervisor and named
//!   by their id; the snapshot carries no descriptor.
//!
//! A restore checks every cross-reference (memfds, handle inodes, the root, counters)
//! and refuses a snapshot that does not hold together. This module never takes the
//! file system's lock itself (its caller does).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use fsva_appliance::state::{BackendState, StateError, StateFd};
use serde::{Deserialize, Serialize};

use crate::data::{FileData, Space};
use crate::dir::Dir;
use crate::handle::{Handle, HandleTable};
use crate::inode::{Inode, InodeTable, Kind};
use crate::xattr::Xattrs;

#[derive(Debug, Serialize, Deserialize)]
enum MemSnapshot {
    V1(SnapshotV1),
    V2(SnapshotV2),
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotV1 {
    capacity: u64,
    next_ino: u64,
    next_fh: u64,
    inodes: Vec<InodeV1>,
    handles: Vec<HandleV1>,
}

/// Version 2: memfds named by id, and the next id to hand out.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotV2 {
    capacity: u64,
    next_ino: u64,
    next_fh: u64,
    next_data_id: u64,
    /// As in V1, but `KindV1::File(Some((id, charged)))` names a memfd by id.
    inodes: Vec<InodeV1>,
    handles: Vec<HandleV2>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InodeV1 {
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub times: [(i64, u32); 5],
    pub lookups: u64,
    pub opens: u64,
    pub kind: KindV1,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum KindV1 {
    /// The memfd (V1: its index among the descriptors; V2: its id) and what it charged.
    File(Option<(u64, u64)>),
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

#[derive(Debug, Serialize, Deserialize)]
struct HandleV2 {
    fh: u64,
    ino: u64,
    /// A file handle: its data is its inode's memfd.
    file: bool,
    flags: u32,
}

/// Where a restore finds the memfds a snapshot names.
pub(crate) enum Descriptors {
    /// Lent beside the state, named by index (V1).
    ByIndex(Vec<StateFd>),
    /// Kept by the supervisor, named by id (V2).
    ById(HashMap<u64, OwnedFd>),
}

/// One inode as a snapshot holds it; `data` names its memfd.
fn inode_record(ino: u64, inode: &Inode, data: &mut dyn FnMut(&Arc<FileData>) -> u64) -> InodeV1 {
    let kind = match &inode.kind {
        Kind::File(None) => KindV1::File(None),
        Kind::File(Some(d)) => KindV1::File(Some((data(d), d.charged()))),
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
    InodeV1 {
        ino,
        mode: inode.mode,
        uid: inode.uid,
        gid: inode.gid,
        nlink: inode.nlink,
        rdev: inode.rdev,
        times: inode.saved_times(),
        lookups: inode.lookups.load(std::sync::atomic::Ordering::SeqCst),
        opens: inode.opens,
        kind,
        xattrs: inode
            .xattrs
            .pairs()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Snapshots `inodes` and `handles`, lending every memfd (V1).
pub(crate) fn take(
    inodes: &InodeTable,
    handles: &HandleTable,
    space: &Space,
) -> Result<BackendState, StateError> {
    let mut fds: Vec<StateFd> = Vec::new();
    // One descriptor per memfd, whoever refers to it (inode and handles share one);
    // lent, not duplicated: the paused file system keeps them open while they are sent.
    let mut index: HashMap<*const FileData, u64> = HashMap::new();
    let mut fd_of = |d: &Arc<FileData>| -> u64 {
        *index.entry(Arc::as_ptr(d)).or_insert_with(|| {
            fds.push(StateFd::Lent(d.clone()));
            (fds.len() - 1) as u64
        })
    };
    let (next_ino, all) = inodes.parts();
    let out: Vec<InodeV1> = all
        .map(|(&ino, inode)| inode_record(ino, inode, &mut fd_of))
        .collect();
    let (next_fh, hs) = handles.parts();
    let hout = hs
        .map(|(&fh, h)| HandleV1 {
            fh,
            ino: h.ino,
            data: h.data.as_ref().map(|d| fd_of(d) as u32),
            flags: h.flags,
        })
        .collect();
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

/// Snapshots `inodes` and `handles` naming memfds by id (V2): a checkpoint for crash
/// recovery, whose memfds the supervisor keeps already.
pub(crate) fn take_by_id(inodes: &InodeTable, handles: &HandleTable, space: &Space) -> Vec<u8> {
    let (next_ino, all) = inodes.parts();
    let out = all
        .map(|(&ino, inode)| inode_record(ino, inode, &mut |d| d.id()))
        .collect();
    let (next_fh, hs) = handles.parts();
    let hout = hs
        .map(|(&fh, h)| HandleV2 {
            fh,
            ino: h.ino,
            file: h.data.is_some(),
            flags: h.flags,
        })
        .collect();
    let snap = MemSnapshot::V2(SnapshotV2 {
        capacity: space.capacity(),
        next_ino,
        next_fh,
        next_data_id: space.peek_next_id(),
        inodes: out,
        handles: hout,
    });
    postcard::to_allocvec(&snap).expect("in-memory snapshot always encodes")
}

/// What a restore rebuilds.
pub(crate) struct Restored {
    pub inodes: InodeTable,
    pub handles: HandleTable,
    /// The next memfd id the snapshot knew of (V2), for the space's counter.
    pub next_data_id: u64,
}

/// Counters near the end of their range would wrap (and reuse the root's number).
pub(crate) const COUNTER_LIMIT: u64 = 1 << 62;

/// Hands out memfds by the names a snapshot uses, each once.
pub(crate) struct DataSource {
    by_index: Vec<Option<StateFd>>,
    by_id: HashMap<u64, OwnedFd>,
    indexed: bool,
    made: HashMap<u64, Arc<FileData>>,
    /// Ids named but not kept: files removed later in the journal (a live file must
    /// not end up with one; see [`DataSource::lost_in_use`]).
    lost: std::collections::HashSet<u64>,
    /// The highest id named anywhere (new memfds are numbered above it).
    top_id: u64,
}

impl DataSource {
    pub(crate) fn new(fds: Descriptors) -> DataSource {
        match fds {
            Descriptors::ByIndex(v) => DataSource {
                by_index: v.into_iter().map(Some).collect(),
                by_id: HashMap::new(),
                indexed: true,
                made: HashMap::new(),
                lost: Default::default(),
                top_id: 0,
            },
            Descriptors::ById(m) => DataSource {
                top_id: m.keys().copied().max().unwrap_or(0),
                by_index: Vec::new(),
                by_id: m,
                indexed: false,
                made: HashMap::new(),
                lost: Default::default(),
            },
        }
    }

    /// The file data named `key` (an index for V1, an id for V2), made once.
    pub(crate) fn get(
        &mut self,
        key: u64,
        charged: u64,
        space: &Arc<Space>,
    ) -> Result<Arc<FileData>, StateError> {
        if let Some(d) = self.made.get(&key) {
            if !self.indexed {
                // Made for an earlier checkpoint: what it charged is this one's now.
                d.set_charged(charged);
            }
            return Ok(d.clone());
        }
        let d = if self.indexed {
            let count = self.by_index.len();
            let fd = usize::try_from(key)
                .ok()
                .and_then(|i| self.by_index.get_mut(i))
                .and_then(Option::take)
                .ok_or(StateError::MissingDescriptor {
                    index: key as u32,
                    count,
                })?
                .into_owned()
                .map_err(|e| StateError::Backend(format!("taking over a memfd: {e}")))?;
            Arc::new(FileData::adopted(fd, charged, space.clone()))
        } else {
            self.top_id = self.top_id.max(key);
            match self.by_id.remove(&key) {
                Some(fd) => Arc::new(FileData::restored(key, fd, charged, space.clone())),
                None => {
                    // Released since: the journal removes its file later, or the state
                    // does not hold together (checked once everything is replayed).
                    self.lost.insert(key);
                    Arc::new(FileData::placeholder(key, space.clone()).map_err(|e| {
                        StateError::Backend(format!("a placeholder for memfd {key}: {e}"))
                    })?)
                }
            }
        };
        self.made.insert(key, d.clone());
        Ok(d)
    }

    /// The highest memfd id named or kept.
    pub(crate) fn top_id(&self) -> u64 {
        self.top_id
    }

    /// Whether some memfd named was not kept.
    pub(crate) fn any_lost(&self) -> bool {
        !self.lost.is_empty()
    }

    /// Whether `d` stands for a memfd that was not kept.
    pub(crate) fn is_lost(&self, d: &FileData) -> bool {
        self.lost.contains(&d.id())
    }

    /// More memfds the supervisor kept (after an earlier part was handed over).
    pub(crate) fn add(&mut self, fds: HashMap<u64, OwnedFd>) {
        for (id, fd) in fds {
            if !self.made.contains_key(&id) {
                self.top_id = self.top_id.max(id);
                self.by_id.insert(id, fd);
            }
        }
    }

    /// Every memfd id handed over (used or not).
    pub(crate) fn received_ids(&self) -> Vec<u64> {
        self.by_id
            .keys()
            .chain(self.made.keys().filter(|id| !self.lost.contains(id)))
            .copied()
            .collect()
    }
}

/// An inode from its snapshot record, its memfd taken from `data`.
pub(crate) fn inode_from(
    i: InodeV1,
    data: &mut DataSource,
    space: &Arc<Space>,
) -> Result<Inode, StateError> {
    let bad = |why: String| StateError::Backend(why);
    let kind = match i.kind {
        KindV1::File(None) => Kind::File(None),
        KindV1::File(Some((key, charged))) => Kind::File(Some(data.get(key, charged, space)?)),
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
        KindV1::Dir { .. } => return Err(bad(format!("directory {} counter out of range", i.ino))),
        KindV1::Symlink(target) => Kind::Symlink(target),
        KindV1::Special => Kind::Special,
    };
    let mut inode = Inode::new(i.mode, i.uid, i.gid, kind);
    inode.nlink = i.nlink;
    inode.rdev = i.rdev;
    inode.restore_times(i.times);
    inode.lookups = AtomicU64::new(i.lookups);
    inode.opens = i.opens;
    inode.xattrs = Xattrs::from_pairs(i.xattrs);
    Ok(inode)
}

/// Rebuilds the tables from `bytes`, charging restored data to `space`; memfds come
/// from `data`.
pub(crate) fn restore(
    bytes: &[u8],
    data: &mut DataSource,
    space: &Arc<Space>,
) -> Result<Restored, StateError> {
    let bad = |why: String| StateError::Backend(why);
    let snap: MemSnapshot =
        postcard::from_bytes(bytes).map_err(|e| StateError::Corrupt(e.to_string()))?;
    // One shape for both versions: handles as (fh, ino, has data, flags).
    let (capacity, next_ino, next_fh, next_data_id, inodes, handles) = match snap {
        MemSnapshot::V1(s) => {
            let hs: Vec<(u64, u64, Option<u64>, u32)> = s
                .handles
                .into_iter()
                .map(|h| (h.fh, h.ino, h.data.map(u64::from), h.flags))
                .collect();
            (s.capacity, s.next_ino, s.next_fh, 1, s.inodes, hs)
        }
        MemSnapshot::V2(s) => {
            let hs = s
                .handles
                .into_iter()
                .map(|h| (h.fh, h.ino, h.file.then_some(u64::MAX), h.flags))
                .collect();
            (
                s.capacity,
                s.next_ino,
                s.next_fh,
                s.next_data_id,
                s.inodes,
                hs,
            )
        }
    };
    if next_ino >= COUNTER_LIMIT || next_fh >= COUNTER_LIMIT || next_data_id >= COUNTER_LIMIT {
        return Err(bad("inode, handle or memfd counter out of range".into()));
    }
    space.set_capacity(capacity);
    let mut map = HashMap::with_capacity(inodes.len());
    for i in inodes {
        let ino = i.ino;
        let inode = inode_from(i, data, space)?;
        if map.insert(ino, inode).is_some() {
            return Err(bad(format!("inode {ino} appears twice")));
        }
    }
    let mut hmap = HashMap::new();
    for (fh, ino, key, flags) in handles {
        let Some(inode) = map.get(&ino) else {
            return Err(bad(format!("handle {fh} refers to missing inode {ino}")));
        };
        let d = match key {
            // V2: a file handle's data is its inode's memfd.
            Some(u64::MAX) => Some(inode.data().cloned().ok_or_else(|| {
                bad(format!(
                    "file handle {fh} on inode {ino}, which has no data"
                ))
            })?),
            Some(i) => Some(data.made.get(&i).cloned().ok_or_else(|| {
                bad(format!(
                    "handle {fh} refers to file data {i} no inode holds"
                ))
            })?),
            None => None,
        };
        hmap.insert(
            fh,
            Handle {
                ino,
                data: d,
                flags,
            },
        );
    }
    let inodes = InodeTable::from_parts(next_ino, map)
        .ok_or_else(|| bad("no root, or inode numbers beyond the counter".into()))?;
    let handles = HandleTable::from_parts(next_fh, hmap)
        .ok_or_else(|| bad("handle numbers beyond the counter".into()))?;
    Ok(Restored {
        inodes,
        handles,
        next_data_id,
    })
}

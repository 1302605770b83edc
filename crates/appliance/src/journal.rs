//! The recovery journal: an append-only log of what an appliance changed, in a memfd
//! the supervisor created and keeps, so that it outlives the appliance.
//!
//! An appliance killed at any moment leaves behind its last checkpoint (kept by the
//! supervisor) and this journal. Its successor restores the checkpoint and replays every
//! record written after it, in order, and so ends in the state the dead appliance had
//! acknowledged. A record also names the request (`unique`) whose effect it holds, which
//! is how a request the kernel resends after the crash is answered from its first
//! execution instead of being executed twice.
//!
//! Layout (all integers little-endian, the memfd sealed against shrinking and growing):
//! - a 4 KiB header: magic, version, the size of an area, the highest sequence number
//!   of a record that could not be written (so a successor knows the log is incomplete
//!   after it), the negotiated FUSE session, and the number of the last record written
//!   whole (a journal whose records end before it was damaged, not merely short);
//! - two areas of equal size. Records go into the current area; a checkpoint switches
//!   to the other one ([`Journal::rotate`]) once everything that area held is covered by
//!   a checkpoint the supervisor stored ([`Journal::covered`]). An area starts with its
//!   epoch and first sequence number; every record carries its sequence number and a
//!   check over (epoch, sequence, payload), so stale bytes of an area's earlier use
//!   never pass for a record;
//! - a record is `[len u32][check u32][seq u64][payload, padded to 8]`; the first word
//!   is stored last, so a writer killed half way leaves no record at all.
//!
//! Appending is serialised by a mutex and costs a copy into shared memory. The caller
//! decides the order of records (a backend appends under its own lock, so that the log
//! order is the order of effects). This module moves bytes; it never interprets a
//! payload, and it trusts nothing it reads back: a successor reads a journal a
//! compromised predecessor may have written.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::state::SessionV1;

const MAGIC: &[u8; 8] = b"FSVAJNL\x01";
const VERSION: u32 = 1;
const HEADER: usize = 4096;
const AREA_HEADER: usize = 64;
const RECORD_HEADER: usize = 16;

// Header offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_AREA_SIZE: usize = 16;
const H_LOST: usize = 24;
const H_SESSION: usize = 32; // minor|valid, flags, max_write, check
/// The sequence number of the last record written whole (so that a journal damaged in
/// the middle is not taken for a shorter one).
const H_WRITTEN: usize = 64;

/// First byte of a record the runtime wrote (see [`crate::backing::RuntimeRecord`]).
pub const RUNTIME: u8 = 0;
/// First byte of a record the backend wrote (its own format).
pub const BACKEND: u8 = 1;

/// Size of each of the two areas unless the supervisor chooses otherwise.
pub const DEFAULT_AREA: u64 = 32 << 20;
/// Smallest and largest area accepted.
const MIN_AREA: u64 = 64 << 10;
const MAX_AREA: u64 = 1 << 30;
/// Records after which a checkpoint is due until the state's size says otherwise (see
/// [`Journal::set_record_threshold`]).
pub const MIN_RECORDS_BETWEEN_CHECKPOINTS: u64 = 4000;
/// Sequence numbers stay below this (a checkpoint claiming more is refused).
pub const COUNTER_LIMIT: u64 = 1 << 62;
/// Largest single record.
pub const MAX_RECORD: usize = 4 << 20;

/// What went wrong with a journal.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("the recovery journal is unusable: {0}")]
    Unusable(String),
    #[error("the recovery journal is full; record {0} was not written (a checkpoint is overdue)")]
    Full(u64),
    #[error("a record of {0} bytes is larger than the journal allows")]
    TooLarge(usize),
    #[error("the recovery journal lost record {lost}, after the checkpoint (which covers up to {boundary}): the state cannot be rebuilt from it")]
    Incomplete { lost: u64, boundary: u64 },
    #[error("the recovery journal has no record {0}, which must follow the checkpoint: the state cannot be rebuilt from it")]
    Gap(u64),
}

fn io_unusable(what: &str, e: std::io::Error) -> JournalError {
    JournalError::Unusable(format!("{what}: {e}"))
}

/// FNV-1a over the parts, folded to 32 bits.
fn check(parts: &[&[u8]]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    (h ^ (h >> 32)) as u32
}

/// Creates a journal with two areas of `area_size` bytes (the supervisor's side): a
/// memfd, sized and sealed against resizing, with its header written.
pub fn create(area_size: u64) -> std::io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let area_size = area_size.clamp(MIN_AREA, MAX_AREA) / 4096 * 4096;
    let fd = rustix::fs::memfd_create(
        "fsva-journal",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&fd, HEADER as u64 + 2 * area_size)?;
    let mut header = [0u8; 32];
    header[H_MAGIC..H_MAGIC + 8].copy_from_slice(MAGIC);
    header[H_VERSION..H_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    header[H_AREA_SIZE..H_AREA_SIZE + 8].copy_from_slice(&area_size.to_le_bytes());
    rustix::io::pwrite(&fd, &header, 0)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// A shared mapping of the whole journal.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through raw-pointer
// copies and atomics on 8-aligned words, and writers are serialised by `Journal::writer`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Mapping> {
        // SAFETY: mapping a memfd we hold, shared, at an address the kernel chooses; the
        // memfd is sealed against shrinking, so no access within `len` can fault.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            base: NonNull::new(p.cast()).expect("mmap never returns null on success"),
            len,
        })
    }

    /// The 8-aligned word at `off` as an atomic.
    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off + 8 <= self.len,
            "journal word out of range"
        );
        // SAFETY: in range and aligned (the mapping is page-aligned); AtomicU64 has the
        // layout of u64 and the memory lives as long as `self`.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU64>() }
    }

    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len, "journal write out of range");
        // SAFETY: in range of the live mapping; the writer mutex keeps other writers
        // off these bytes, and readers only read after the record's header is stored.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.as_ptr().add(off), bytes.len())
        }
    }

    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len, "journal read out of range");
        let mut out = vec![0u8; len];
        // SAFETY: in range of the live mapping; the bytes are copied out before anyone
        // interprets them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), out.as_mut_ptr(), len)
        };
        out
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no reference into it outlives self.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The writer's position.
#[derive(Debug)]
struct Writer {
    /// Area records go to (0 or 1).
    current: usize,
    /// Offset of the next record within the current area.
    cursor: usize,
    next_seq: u64,
    epoch: [u64; 2],
    /// Highest sequence number written into each area (0: none).
    last_in: [u64; 2],
    /// The boundary of the newest checkpoint the supervisor stored.
    stored: u64,
    /// Records since the last checkpoint was taken.
    since_checkpoint: u64,
}

/// One record read back for recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// An appliance's view of its journal.
pub struct Journal {
    fd: OwnedFd,
    map: Mapping,
    area: usize,
    writer: Mutex<Writer>,
    /// Bytes in the current area past which a checkpoint is due.
    threshold: usize,
    /// Records after which a checkpoint is due (a successor replays at most about
    /// this many); set from the size of the state ([`Journal::set_record_threshold`]).
    record_threshold: AtomicU64,
    due: Condvar,
}

impl Journal {
    /// Maps the journal in `fd` and checks its header. Writing starts at the
    /// beginning of area 0 unless [`Journal::recover`] positions it after old records.
    pub fn open(fd: OwnedFd) -> Result<Journal, JournalError> {
        let size = rustix::fs::fstat(&fd)
            .map_err(|e| io_unusable("inspecting it", e.into()))?
            .st_size as u64;
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(|e| io_unusable("reading its seals", e.into()))?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW) {
            return Err(JournalError::Unusable(
                "it is not sealed against resizing".into(),
            ));
        }
        let mut head = [0u8; 32];
        rustix::io::pread(&fd, &mut head, 0)
            .map_err(|e| io_unusable("reading its header", e.into()))?;
        if &head[H_MAGIC..H_MAGIC + 8] != MAGIC {
            return Err(JournalError::Unusable(
                "no journal magic in its header".into(),
            ));
        }
        let version = u32::from_le_bytes(head[H_VERSION..H_VERSION + 4].try_into().unwrap());
        if version != VERSION {
            return Err(JournalError::Unusable(format!(
                "version {version}, this fsva reads {VERSION}"
            )));
        }
        let area = u64::from_le_bytes(head[H_AREA_SIZE..H_AREA_SIZE + 8].try_into().unwrap());
        if !(MIN_AREA..=MAX_AREA).contains(&area)
            || area % 4096 != 0
            || size != HEADER as u64 + 2 * area
        {
            return Err(JournalError::Unusable(format!(
                "areas of {area} bytes do not fit a journal of {size} bytes"
            )));
        }
        let map =
            Mapping::new(fd.as_fd(), size as usize).map_err(|e| io_unusable("mapping it", e))?;
        let journal = Journal {
            fd,
            map,
            area: area as usize,
            writer: Mutex::new(Writer {
                current: 0,
                cursor: AREA_HEADER,
                next_seq: 1,
                epoch: [0; 2],
                last_in: [0; 2],
                stored: 0,
                since_checkpoint: 0,
            }),
            threshold: (area as usize / 8).max(64 << 10),
            record_threshold: AtomicU64::new(MIN_RECORDS_BETWEEN_CHECKPOINTS),
            due: Condvar::new(),
        };
        Ok(journal)
    }

    /// The journal's memfd (to hand to a successor).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn area_base(&self, area: usize) -> usize {
        HEADER + area * self.area
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts area `area` afresh with `epoch`, its first record numbered `first_seq`.
    fn reset_area(&self, area: usize, epoch: u64, first_seq: u64) {
        let base = self.area_base(area);
        // Give the old records' memory back; the range then reads as zeroes.
        // SAFETY: fallocate on our own memfd, within its size.
        unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                base as libc::off_t,
                self.area as libc::off_t,
            )
        };
        let mut h = [0u8; 24];
        h[0..8].copy_from_slice(&epoch.to_le_bytes());
        h[8..16].copy_from_slice(&first_seq.to_le_bytes());
        let c = check(&[&h[0..16]]);
        h[16..24].copy_from_slice(&u64::from(c).to_le_bytes());
        self.map.write(base, &h);
    }

    /// Appends one record; returns its sequence number. A record that does not fit is
    /// counted as lost (the header says so, and a successor refuses to rebuild from a
    /// checkpoint older than it) and reported as [`JournalError::Full`].
    pub fn append(&self, payload: &[u8]) -> Result<u64, JournalError> {
        let mut w = self.lock();
        let w = &mut *w;
        let seq = w.next_seq;
        w.next_seq += 1;
        if payload.len() > MAX_RECORD {
            // Lost like a record that did not fit: a successor must not rebuild a state
            // without it (until a checkpoint covers it).
            self.map.word(H_LOST).fetch_max(seq, Ordering::SeqCst);
            return Err(JournalError::TooLarge(payload.len()));
        }
        let current = w.current;
        if w.cursor == AREA_HEADER && w.last_in[current] == 0 && w.epoch[current] == 0 {
            // First record ever in this area: stamp it.
            w.epoch[current] = 1;
            self.reset_area(current, 1, seq);
        }
        let total = RECORD_HEADER + payload.len().div_ceil(8) * 8;
        if w.cursor + total > self.area {
            self.map.word(H_LOST).fetch_max(seq, Ordering::SeqCst);
            return Err(JournalError::Full(seq));
        }
        let off = self.area_base(current) + w.cursor;
        let epoch = w.epoch[current];
        self.map.write(off + 8, &seq.to_le_bytes());
        self.map.write(off + RECORD_HEADER, payload);
        let c = check(&[&epoch.to_le_bytes(), &seq.to_le_bytes(), payload]);
        let head = u64::from(payload.len() as u32) | (u64::from(c) << 32);
        self.map.word(off).store(head, Ordering::Release);
        self.map.word(H_WRITTEN).store(seq, Ordering::Release);
        w.cursor += total;
        w.last_in[current] = seq;
        w.since_checkpoint += 1;
        let records = self.record_threshold.load(Ordering::Relaxed);
        if (w.cursor >= self.threshold && w.cursor - total < self.threshold)
            || w.since_checkpoint == records
        {
            self.due.notify_all();
        }
        Ok(seq)
    }

    fn due_now(&self, w: &Writer) -> bool {
        w.cursor >= self.threshold
            || w.since_checkpoint >= self.record_threshold.load(Ordering::Relaxed)
    }

    /// Whether a checkpoint is due: the current area is filling up, or the records
    /// since the last one would take a successor long to replay.
    pub fn checkpoint_due(&self) -> bool {
        self.due_now(&self.lock())
    }

    /// A checkpoint becomes due after `records` records.
    pub fn set_record_threshold(&self, records: u64) {
        self.record_threshold
            .store(records.max(1), Ordering::Relaxed);
    }

    /// Waits up to `timeout` for a checkpoint to become due; returns whether it is.
    pub fn wait_due(&self, timeout: std::time::Duration) -> bool {
        let w = self.lock();
        if self.due_now(&w) {
            return true;
        }
        let (w, _) = self
            .due
            .wait_timeout(w, timeout)
            .unwrap_or_else(|p| p.into_inner());
        self.due_now(&w)
    }

    /// Marks a checkpoint: every record written so far is covered by it (the caller
    /// holds whatever lock orders its records, so the checkpoint and this boundary
    /// agree). Returns the boundary. Records go to the other area from now on when
    /// everything it holds is covered by the checkpoint the supervisor stored last;
    /// otherwise they stay here until a later checkpoint.
    pub fn rotate(&self) -> u64 {
        let mut w = self.lock();
        let boundary = w.next_seq - 1;
        w.since_checkpoint = 0;
        let other = 1 - w.current;
        if w.last_in[other] <= w.stored {
            let epoch = w.epoch[0].max(w.epoch[1]) + 1;
            self.reset_area(other, epoch, w.next_seq);
            w.epoch[other] = epoch;
            w.last_in[other] = 0;
            w.current = other;
            w.cursor = AREA_HEADER;
        }
        boundary
    }

    /// The supervisor stored a checkpoint covering every record up to `boundary`.
    pub fn covered(&self, boundary: u64) {
        let mut w = self.lock();
        w.stored = w.stored.max(boundary);
    }

    /// Forgets every record (the state they belong to is lost, and a new one starts
    /// empty); the session stays. Numbering starts again at 1.
    pub fn clear(&self) {
        let mut w = self.lock();
        let epoch = w.epoch[0].max(w.epoch[1]) + 1;
        self.reset_area(1, epoch, 0);
        self.reset_area(0, epoch + 1, 1);
        *w = Writer {
            current: 0,
            cursor: AREA_HEADER,
            next_seq: 1,
            epoch: [epoch + 1, epoch],
            last_in: [0; 2],
            stored: 0,
            since_checkpoint: 0,
        };
        self.map.word(H_LOST).store(0, Ordering::SeqCst);
        self.map.word(H_WRITTEN).store(0, Ordering::SeqCst);
    }

    /// Records the negotiated FUSE session (at INIT).
    pub fn set_session(&self, s: SessionV1) {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&(u64::from(s.minor) | 1 << 32).to_le_bytes());
        b[8..16].copy_from_slice(&s.flags.to_le_bytes());
        b[16..24].copy_from_slice(&u64::from(s.max_write).to_le_bytes());
        let c = check(&[&b[0..24]]);
        b[24..32].copy_from_slice(&u64::from(c).to_le_bytes());
        let _w = self.lock();
        self.map.write(H_SESSION, &b);
    }

    /// The negotiated session a predecessor recorded, if any (and intact).
    pub fn session(&self) -> Option<SessionV1> {
        let b = self.map.read(H_SESSION, 32);
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        if word(0) >> 32 != 1 || word(24) != u64::from(check(&[&b[0..24]])) {
            return None;
        }
        Some(SessionV1 {
            minor: word(0) as u32,
            flags: word(8),
            max_write: u32::try_from(word(16)).ok()?,
        })
    }

    /// Reads back every record after `boundary` (the checkpoint's), in order, and
    /// positions the writer after the last one. Fails when a record after the boundary
    /// is missing or was lost, so that a successor never rebuilds a state with a hole.
    pub fn recover(&self, boundary: u64) -> Result<Vec<Record>, JournalError> {
        let (records, areas) = self.records_after(boundary, true)?;
        let last = records.last().map_or(boundary, |r| r.seq);
        // Every record of an area must be contiguous with the rest; continue writing
        // where the newest area ends.
        let newest = if areas[1].epoch > areas[0].epoch {
            1
        } else {
            0
        };
        let mut w = self.lock();
        w.epoch = [areas[0].epoch, areas[1].epoch];
        w.last_in = [areas[0].last_seq, areas[1].last_seq];
        w.next_seq = last
            .max(areas[0].last_seq)
            .max(areas[1].last_seq)
            .saturating_add(1);
        w.stored = boundary;
        // The records after the checkpoint are a successor's to replay too: count them.
        w.since_checkpoint = records.len() as u64;
        if areas[newest].epoch == 0 {
            // Never written: start cleanly.
            w.current = 0;
            w.cursor = AREA_HEADER;
            w.epoch = [0; 2];
        } else {
            w.current = newest;
            w.cursor = areas[newest].end;
            if areas[newest].last_seq == 0 {
                // Started by a rotation but holding no record: its first record is the
                // next one.
                self.reset_area(newest, areas[newest].epoch, w.next_seq);
                w.cursor = AREA_HEADER;
            }
        }
        Ok(records)
    }

    /// Reads back every record after `boundary`, in order, as [`Journal::recover`] does,
    /// but leaves the journal as it is: for reading a stopped appliance's journal
    /// without becoming its writer (a migration sends these records to another host).
    pub fn read_after(&self, boundary: u64) -> Result<Vec<Record>, JournalError> {
        self.read(boundary, true)
    }

    /// As [`Journal::read_after`], while the appliance still writes: records written
    /// meanwhile may be missing at the end (each record is seen whole or not at all),
    /// so a record written but not seen is no sign of damage here.
    pub fn read_live(&self, boundary: u64) -> Result<Vec<Record>, JournalError> {
        self.read(boundary, false)
    }

    fn read(&self, boundary: u64, stopped: bool) -> Result<Vec<Record>, JournalError> {
        self.records_after(boundary, stopped)
            .map(|(records, _)| records)
    }

    /// Every record after `boundary`, in order, checked to have no hole (and, when the
    /// writer is `stopped`, to end where it wrote its last whole record), with what the
    /// scan of each area found.
    fn records_after(
        &self,
        boundary: u64,
        stopped: bool,
    ) -> Result<(Vec<Record>, [AreaScan; 2]), JournalError> {
        if boundary >= COUNTER_LIMIT {
            return Err(JournalError::Unusable(format!(
                "a checkpoint claims to cover record {boundary}, beyond any journal"
            )));
        }
        let lost = self.map.word(H_LOST).load(Ordering::SeqCst);
        if lost > boundary {
            return Err(JournalError::Incomplete { lost, boundary });
        }
        // Records the boundary covers are walked over, not read (see `scan`).
        let mut areas = [self.scan(0, boundary), self.scan(1, boundary)];
        let mut records: Vec<Record> = areas
            .iter_mut()
            .flat_map(|s| std::mem::take(&mut s.records))
            .filter(|r| r.seq > boundary)
            .collect();
        records.sort_by_key(|r| r.seq);
        for (i, r) in records.iter().enumerate() {
            let want = boundary + 1 + i as u64;
            if r.seq != want {
                return Err(JournalError::Gap(want));
            }
        }
        let last = records.last().map_or(boundary, |r| r.seq);
        if stopped && self.map.word(H_WRITTEN).load(Ordering::Acquire) > last {
            // Records that were written whole are unreadable: the journal is damaged.
            return Err(JournalError::Gap(last + 1));
        }
        Ok((records, areas))
    }

    /// Writes `records` — numbered `after + 1` on, in order — into a journal nothing
    /// has written yet, as if this journal's appliance had written them after a
    /// checkpoint at `after`: another host's journal tail, so that an appliance here
    /// rebuilds from the same checkpoint and records (migration). Writing goes on
    /// after them.
    pub fn seed(&self, after: u64, records: &[Record]) -> Result<(), JournalError> {
        {
            let mut w = self.lock();
            if w.next_seq != 1 || w.epoch != [0; 2] || w.cursor != AREA_HEADER {
                return Err(JournalError::Unusable(
                    "records can only be seeded into a journal nothing wrote yet".into(),
                ));
            }
            w.next_seq = after + 1;
            w.stored = after;
        }
        for (i, r) in records.iter().enumerate() {
            let want = after + 1 + i as u64;
            if r.seq != want {
                return Err(JournalError::Gap(want));
            }
            self.append(&r.payload)?;
        }
        Ok(())
    }

    /// The valid records of area `a` after `boundary`, from its start to the first
    /// invalid one (records the checkpoint covers are walked over, not read).
    fn scan(&self, a: usize, boundary: u64) -> AreaScan {
        let base = self.area_base(a);
        let h = self.map.read(base, 24);
        let epoch = u64::from_le_bytes(h[0..8].try_into().unwrap());
        let first = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let hc = u64::from_le_bytes(h[16..24].try_into().unwrap());
        let mut scan = AreaScan {
            epoch: 0,
            last_seq: 0,
            end: AREA_HEADER,
            records: Vec::new(),
        };
        if epoch == 0 || hc != u64::from(check(&[&h[0..16]])) {
            return scan;
        }
        scan.epoch = epoch;
        let mut off = AREA_HEADER;
        let mut want = first;
        while off + RECORD_HEADER <= self.area {
            let head = self.map.word(base + off).load(Ordering::Acquire);
            let len = (head & 0xffff_ffff) as usize;
            let c = (head >> 32) as u32;
            if head == 0 || len > MAX_RECORD || off + RECORD_HEADER + len > self.area {
                break;
            }
            let seq = self.map.word(base + off + 8).load(Ordering::Relaxed);
            if seq != want {
                break;
            }
            if seq > boundary {
                let payload = self.map.read(base + off + RECORD_HEADER, len);
                if c != check(&[&epoch.to_le_bytes(), &seq.to_le_bytes(), &payload]) {
                    break;
                }
                scan.records.push(Record { seq, payload });
            }
            scan.last_seq = seq;
            want += 1;
            off += RECORD_HEADER + len.div_ceil(8) * 8;
        }
        scan.end = off;
        scan
    }
}

struct AreaScan {
    epoch: u64,
    last_seq: u64,
    /// Offset after the last valid record.
    end: usize,
    records: Vec<Record>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(area: u64) -> (Journal, OwnedFd) {
        let fd = create(area).unwrap();
        let keep = fd.try_clone().unwrap();
        (Journal::open(fd).unwrap(), keep)
    }

    fn reopen(fd: &OwnedFd) -> Journal {
        Journal::open(fd.try_clone().unwrap()).unwrap()
    }

    fn payloads(r: &[Record]) -> Vec<Vec<u8>> {
        r.iter().map(|r| r.payload.clone()).collect()
    }

    #[test]
    fn records_survive_the_writer_and_a_successor_continues() {
        let (j, fd) = journal(MIN_AREA);
        assert_eq!(j.append(b"one").unwrap(), 1);
        assert_eq!(j.append(b"").unwrap(), 2);
        assert_eq!(j.append(&[7u8; 100]).unwrap(), 3);
        drop(j);
        let s = reopen(&fd);
        let r = s.recover(0).unwrap();
        assert_eq!(payloads(&r), vec![b"one".to_vec(), vec![], vec![7u8; 100]]);
        assert_eq!(
            s.recover(2).unwrap().len(),
            1,
            "records after the boundary only"
        );
        assert_eq!(s.append(b"four").unwrap(), 4);
        drop(s);
        let t = reopen(&fd);
        assert_eq!(t.recover(0).unwrap().len(), 4);
    }

    #[test]
    fn a_torn_or_altered_record_ends_the_log() {
        let (j, fd) = journal(MIN_AREA);
        for i in 0..5u8 {
            j.append(&[i; 10]).unwrap();
        }
        // Corrupt the third record's payload: the records after it are lost, and the
        // journal says so instead of passing for a shorter one.
        let off = HEADER + AREA_HEADER + 2 * (RECORD_HEADER + 16) + RECORD_HEADER;
        j.map.write(off, b"X");
        drop(j);
        let s = reopen(&fd);
        assert_eq!(s.recover(0), Err(JournalError::Gap(3)));
        // A writer killed half way through its last record leaves it unwritten: that
        // journal is whole (the header was not moved past it).
        s.map.word(H_WRITTEN).store(2, Ordering::SeqCst);
        assert_eq!(s.recover(0).unwrap().len(), 2);
        assert_eq!(
            s.append(b"next").unwrap(),
            3,
            "writing continues after the last good record"
        );
        drop(s);
        assert_eq!(
            payloads(&reopen(&fd).recover(2).unwrap()),
            vec![b"next".to_vec()]
        );
    }

    #[test]
    fn rotation_keeps_what_the_stored_checkpoint_does_not_cover() {
        let (j, fd) = journal(MIN_AREA);
        j.append(b"a").unwrap();
        j.append(b"b").unwrap();
        let b1 = j.rotate();
        assert_eq!(b1, 2);
        j.append(b"c").unwrap();
        // Checkpoint b1 not stored yet: the next rotation must not drop area 0.
        let b2 = j.rotate();
        assert_eq!(b2, 3);
        j.append(b"d").unwrap();
        drop(j);
        let s = reopen(&fd);
        assert_eq!(
            payloads(&s.recover(0).unwrap()),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]
        );
        // Once a checkpoint is stored, the area it covers is reused.
        s.covered(3);
        let b3 = s.rotate();
        assert_eq!(b3, 4);
        s.append(b"e").unwrap();
        drop(s);
        let t = reopen(&fd);
        assert_eq!(payloads(&t.recover(4).unwrap()), vec![b"e".to_vec()]);
        assert_eq!(
            t.recover(0),
            Err(JournalError::Gap(1)),
            "records before the checkpoint are gone"
        );
    }

    #[test]
    fn a_full_journal_says_so_and_a_later_checkpoint_heals_it() {
        let (j, fd) = journal(MIN_AREA);
        let big = vec![1u8; 16 << 10];
        let mut lost = None;
        for _ in 0..10 {
            if let Err(JournalError::Full(seq)) = j.append(&big) {
                lost = Some(seq);
                break;
            }
        }
        let lost = lost.expect("the area filled up");
        drop(j);
        let s = reopen(&fd);
        assert!(matches!(s.recover(0), Err(JournalError::Incomplete { .. })));
        assert!(
            s.recover(lost).is_ok(),
            "a checkpoint after the loss covers it"
        );
    }

    #[test]
    fn clearing_forgets_every_record_and_keeps_the_session() {
        let (j, fd) = journal(MIN_AREA);
        let s = SessionV1 {
            minor: 45,
            flags: 3,
            max_write: 4096,
        };
        j.set_session(s);
        j.append(b"a").unwrap();
        j.rotate();
        j.append(b"b").unwrap();
        j.clear();
        j.append(b"new").unwrap();
        drop(j);
        let r = reopen(&fd);
        assert_eq!(payloads(&r.recover(0).unwrap()), vec![b"new".to_vec()]);
        assert_eq!(r.session(), Some(s));
    }

    #[test]
    fn the_session_is_kept_and_checked() {
        let (j, fd) = journal(MIN_AREA);
        assert_eq!(j.session(), None);
        let s = SessionV1 {
            minor: 45,
            flags: 0xdead_beef_0000_0001,
            max_write: 1 << 20,
        };
        j.set_session(s);
        drop(j);
        let r = reopen(&fd);
        assert_eq!(r.session(), Some(s));
        r.map.write(H_SESSION + 8, &[0xff]);
        assert_eq!(r.session(), None, "a damaged session is not trusted");
    }

    #[test]
    fn a_checkpoint_boundary_beyond_any_journal_is_refused_not_a_panic() {
        let fd = create(MIN_AREA).unwrap();
        let j = Journal::open(fd).unwrap();
        assert!(matches!(
            j.recover(u64::MAX),
            Err(JournalError::Unusable(_))
        ));
        assert_eq!(j.append(b"x").unwrap(), 1, "numbering untouched");
    }

    #[test]
    fn foreign_or_resized_memfds_are_refused() {
        let fd = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
        assert!(matches!(Journal::open(fd), Err(JournalError::Unusable(_))));
    }

    #[test]
    fn a_tail_read_elsewhere_seeds_another_journal() {
        let (j, fd) = journal(MIN_AREA);
        for i in 0..6u8 {
            j.append(&[i; 5]).unwrap();
        }
        // Reading leaves the journal as it was: its writer goes on where it was.
        let tail = reopen(&fd).read_after(3).unwrap();
        assert_eq!(tail.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5, 6]);
        assert_eq!(j.append(b"seven").unwrap(), 7);

        let (other, other_fd) = journal(MIN_AREA);
        other.seed(3, &tail).unwrap();
        assert_eq!(
            other.append(b"next").unwrap(),
            7,
            "writing goes on after the tail"
        );
        drop(other);
        let r = reopen(&other_fd).recover(3).unwrap();
        assert_eq!(r.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5, 6, 7]);
        assert_eq!(r[0].payload, [3u8; 5]);
        // A tail with a hole, or a journal already written, is refused.
        let (fresh, _) = journal(MIN_AREA);
        assert_eq!(fresh.seed(2, &tail), Err(JournalError::Gap(3)));
        assert!(matches!(j.seed(3, &tail), Err(JournalError::Unusable(_))));

        // After a checkpoint's rotation, the tail after it comes from the new area
        // alone, and a tail from before it from both.
        assert_eq!(j.rotate(), 7);
        j.append(b"eight").unwrap();
        j.append(b"nine").unwrap();
        let r = reopen(&fd);
        let seqs = |v: Vec<Record>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(r.read_after(7).unwrap()), [8, 9]);
        assert_eq!(seqs(r.read_after(8).unwrap()), [9]);
        assert_eq!(seqs(r.read_after(5).unwrap()), [6, 7, 8, 9]);
    }
}
